#!/usr/bin/env nextflow
/*
 * zseg: Cellpose segmentation of microscopy volumes of any size, identical whatever the chunking.
 *
 *   nextflow run main.nf --input vol.ome.zarr --outdir results [--model cpsam] [-profile gpu,...]
 *   nextflow run main.nf --input vol.ome.zarr --flows flows.zarr --outdir results   (no network)
 *
 * Each process runs one `zseg` phase command; all logic lives there. This file checks the
 * parameters, which are the fields of zseg's parameter model (nextflow_schema.json,
 * docs/nextflow.md), and hands them to the ZSEG workflow.
 */

include { ZSEG             } from './workflows/zseg'
include { ZSEG_SYNTH       } from './modules/local/synth'
include { ZSEG_SYNTH_SLIDE } from './modules/local/synth_slide'
include { ZSEG_SAMPLESHEET } from './modules/local/samplesheet'

workflow {
    if (!params.outdir) {
        error("--outdir is missing: give the folder (local path or s3:// URI) for labels.zarr, cells.parquet and run.json.")
    }
    if (!params.synth && !params.synth_multiplex && !params.input) {
        error("--input is missing: give the volume to segment (OME-Zarr, zarr array or TIFF; local path or s3:// URI).")
    }
    // The processes pass these to the shell inside single quotes: a quote or a line break in
    // one could end the quoting, so such a value is refused (tests/test_reliability.py).
    ['input', 'flows', 'nuclear_flows', 'outdir', 'work', 'synth', 'model', 'model_ortho', 'nuclear_model', 'mask'].each { name ->
        if (params[name] && params[name].toString() =~ /['\n\r]/) {
            error("--${name}: a path with a single quote or a line break cannot be passed to the tasks safely; rename or move it.")
        }
    }
    if (!(params.shard_size.toString() ==~ /[1-9][0-9]*/)) {
        error("--shard_size ${params.shard_size}: give the number of chunks per task, a whole number of 1 or more.")
    }
    def profiles = workflow.profile.tokenize(',')
    if (profiles.contains('awsbatch') && !params.queue) {
        error("-profile awsbatch needs --queue: the AWS Batch job queue to submit the tasks to.")
    }
    if (profiles.contains('google') && profiles.contains('gpu') && !params.gpu_type) {
        error("-profile google,gpu needs --gpu_type: the accelerator type of the GPU tasks, e.g. nvidia-l4.")
    }

    def outdir = absoluteUri(params.outdir)
    def modelMounts = [modelPath(params.model), modelPath(params.model_ortho), modelPath(params.nuclear_model),
                       modelsDir(params.models_dir)]
    def run_params = new LinkedHashMap(params) + [launch_dir: workflow.launchDir.toString()]
    def ch_data = null
    if (params.synth) {
        ZSEG_SYNTH(channel.value([runMeta(outdir, [params.outdir, params.work] + modelMounts), params.synth.toString()]))
        ch_data = ZSEG_SYNTH.out.data.map { m, image, flows -> [m, image.toUriString(), flows.toUriString()] }
    }
    else if (params.synth_multiplex) {
        // a synthetic multiplex slide with the exact flows of both compartments (-profile test_multiplex)
        ZSEG_SYNTH_SLIDE(channel.value([runMeta(outdir, [params.outdir, params.work] + modelMounts), params.synth_multiplex.toString()]))
        ch_data = ZSEG_SYNTH_SLIDE.out.data.map { m, slide, flows, nuclear ->
            [m + [nuclear_flows: nuclear.toUriString()], slide.toUriString(), flows.toUriString()]
        }
    }
    else if (params.input.toString().toLowerCase().endsWith('.csv')) {
        // a samplesheet: zseg validates it and names each row's output folder; one run per row
        def sheet = absoluteUri(params.input)
        def sheet_meta = [id: sheet.tokenize('/')[-1], container_options: mountOptions([sheet] + samplesheetPaths(sheet))]
        ZSEG_SAMPLESHEET(channel.value([sheet_meta, isRemote(sheet) ? [] : file(sheet)]), run_params)
        ch_data = ZSEG_SAMPLESHEET.out.samples.flatMap { json ->
            new groovy.json.JsonSlurper().parse(json.toFile()).samples.collect { row ->
                def meta = runMeta(row.outdir, [row.image, row.flows, row.outdir, row.work, params.mask] + modelMounts)
                [meta + [work: row.work], row.image, row.flows ?: '']
            }
        }
    }
    else {
        def meta = runMeta(outdir, [params.input, params.flows, params.nuclear_flows, params.outdir, params.work, params.mask] + modelMounts)
        ch_data = channel.value([meta, absoluteUri(params.input), params.flows ? absoluteUri(params.flows) : ''])
    }

    // every parameter goes to `zseg plan` as it is: zseg maps Nextflow's names to its own,
    // resolves relative paths and model names, and refuses what it does not know
    // (launch_dir as text: a Path in a task's script would be hashed with its mtime, and break -resume)
    ZSEG(ch_data, run_params, params.shard_size as Integer)

    ZSEG.out.report.view { m, _report -> "zseg: finished; labels in ${m.run}/labels.zarr, run report in ${m.run}/run.json" }
}

// The meta of one run: its name (the output folder's; for a samplesheet row, its sample), its
// output folder, the container options that mount the local paths it reads and writes, and this
// Nextflow session (-resume keeps it): the plan task claims the folder for it and every task
// refuses a folder of another session (zseg/workspace/lock.py).
def runMeta(String run, List mounts) {
    return [id: run.tokenize('/')[-1], run: run, container_options: mountOptions(mounts),
            session: workflow.sessionId.toString()]
}

// Cellpose's model folder as the tasks see it (the rule of env.CELLPOSE_LOCAL_MODELS_PATH in
// nextflow.config), made if missing, so that a container mounts it and a download lands there.
def modelsDir(given) {
    def dir = given ?: (System.getenv('CELLPOSE_LOCAL_MODELS_PATH') ?: "${System.getProperty('user.home')}/.cellpose/models")
    if (!isRemote(dir.toString()) && workflow.containerEngine) {
        file(dir.toString()).mkdirs()
    }
    return absoluteUri(dir)
}

// --model as an absolute path when it names a file (a built-in name such as cpsam is looked up
// in CELLPOSE_LOCAL_MODELS_PATH by the tasks); null otherwise.
def modelPath(model) {
    def text = model ? model.toString() : ''
    return text.contains('/') || text.endsWith('.pt') || text.endsWith('.pth') ? absoluteUri(text) : null
}

// The image and flows paths a local samplesheet names, for mounting into the container of the task
// that checks it (zseg itself reads and validates the sheet: a sheet it cannot parse here gives none).
def samplesheetPaths(String sheet) {
    if (isRemote(sheet) || !file(sheet).exists()) {
        return []
    }
    try {
        return file(sheet).splitCsv(header: true).collectMany { row -> [row.image, row.flows] }
            .findAll { value -> value }.collect { value -> absoluteUri(value.toString().trim()) }
    }
    catch (Exception _e) {
        return []
    }
}

// A URI (s3://...) as given; a local path made absolute, since each task runs in its own folder.
def absoluteUri(value) {
    def text = value.toString()
    return isRemote(text) ? text : file(text).toString()
}

def isRemote(String text) {
    return text ==~ /^[A-Za-z][A-Za-z0-9+.-]*:\/\/.*/
}

// Stores travel as URIs, so a container sees a local folder only when it is mounted: mount the
// folder around each local input and output (Nextflow itself mounts its work folder).
def mountOptions(List values) {
    def dirs = values
        .findAll { value -> value && !isRemote(value.toString()) }
        .collect { value -> mountPoint(file(value.toString())) }
        .unique()
    if (workflow.containerEngine in ['singularity', 'apptainer']) {
        return dirs.collect { dir -> "-B ${dir}" }.join(' ')
    }
    if (workflow.containerEngine in ['docker', 'podman']) {
        // the calling user, not the image's, so that the task can write its folders
        return (['-u $(id -u):$(id -g)'] + dirs.collect { dir -> "-v ${dir}:${dir}" }).join(' ')
    }
    return ''
}

// The parent folder of a path (an output may not exist yet), or the path itself below /.
def mountPoint(path) {
    def parent = path.parent
    return parent == null || parent.parent == null ? path.toString() : parent.toString()
}
