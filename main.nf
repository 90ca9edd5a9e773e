#!/usr/bin/env nextflow
/*
 * zseg: Cellpose segmentation of microscopy volumes of any size, identical whatever the chunking.
 *
 *   nextflow run main.nf --input vol.ome.zarr --flows flows.zarr --outdir results [-profile ...]
 *
 * Each process runs one `zseg` phase command; all logic lives there. This file checks the
 * parameters, which are the fields of zseg's parameter model (nextflow_schema.json,
 * docs/nextflow.md), and hands them to the ZSEG workflow.
 */

include { ZSEG       } from './workflows/zseg'
include { ZSEG_SYNTH } from './modules/local/synth'

workflow {
    if (!params.outdir) {
        error("--outdir is missing: give the folder (local path or s3:// URI) for labels.zarr, cells.parquet and run.json.")
    }
    if (!params.synth && !params.input) {
        error("--input is missing: give the volume to segment (OME-Zarr, zarr array or TIFF; local path or s3:// URI).")
    }
    if (!params.synth && !params.flows) {
        error("--flows is missing: this zseg has no network phase yet, so it segments from a precomputed flow store " +
            "(zarr array (4, Z, Y, X) = dZ, dY, dX, cellprob); `zseg synth` writes one for a synthetic volume, as -profile test does.")
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
    def meta = [
        id: outdir.tokenize('/')[-1],
        run: outdir,
        container_options: mountOptions([params.input, params.flows, params.outdir, params.work]),
    ]

    // Every RunParams field but input, output and flows (given with the data) and workers (a
    // local run's pool); null leaves zseg's default (nextflow_schema.json shows it).
    def run_params = [
        work: params.work ? absoluteUri(params.work) : null,
        axes: params.axes,
        level: params.level,
        channels: params.channels,
        timepoint: params.timepoint,
        voxel_size: params.voxel_size,
        anisotropy: params.anisotropy,
        model: params.model,
        diameter: params.diameter,
        percentiles: params.percentiles,
        exclude_zeros: params.exclude_zeros,
        cellprob_threshold: params.cellprob_threshold,
        niter: params.niter,
        flow3D_smooth: params.flow3D_smooth,
        min_size: params.min_size,
        max_size: params.max_size,
        chunk_shape: params.chunk_shape,
        halo: params.halo,
        device: params.device,
        zarr_format: params.zarr_format,
        overwrite: params.overwrite,
    ]

    def ch_data = null
    if (params.synth) {
        ZSEG_SYNTH(channel.value([meta, params.synth.toString()]))
        ch_data = ZSEG_SYNTH.out.data.map { m, image, flows -> [m, image.toUriString(), flows.toUriString()] }
    }
    else {
        ch_data = channel.value([meta, absoluteUri(params.input), absoluteUri(params.flows)])
    }

    ZSEG(ch_data, run_params, params.shard_size as Integer)

    ZSEG.out.report.view { m, _report -> "zseg: finished; labels in ${m.run}/labels.zarr, run report in ${m.run}/run.json" }
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
    if (workflow.containerEngine == 'docker') {
        return (['-u $(id -u):$(id -g)'] + dirs.collect { dir -> "-v ${dir}:${dir}" }).join(' ')
    }
    if (workflow.containerEngine == 'podman') {
        return dirs.collect { dir -> "-v ${dir}:${dir}" }.join(' ')
    }
    return ''
}

// The parent folder of a path (an output may not exist yet), or the path itself below /.
def mountPoint(path) {
    def parent = path.parent
    return parent == null || parent.parent == null ? path.toString() : parent.toString()
}
