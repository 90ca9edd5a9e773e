// Validate the samplesheet (--input SHEET.csv) against assets/schema_input.json and emit its rows
// with their output folders (OUTDIR/<sample>, and WORK/<sample> with --work) as samples.json,
// from which the workflow makes one run per row. run_params are the run's params as Nextflow
// has them, with launch_dir, the folder relative paths are relative to.
process ZSEG_SAMPLESHEET {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // meta: the sheet's name and the mounts of the paths it names; sheet_file: the local sheet
    // again, as a path, so that -resume sees an edited sheet ([] for a URI, which zseg reads itself)
    tuple val(meta), path(sheet_file, stageAs: 'input/*')
    val run_params

    output:
    path('samples.json'), emit: samples

    script:
    def args = task.ext.args ?: ''
    def json = groovy.json.JsonOutput.toJson(run_params)
    """
    cat > nextflow_params.json <<'ZSEG_PARAMS'
    ${json}
    ZSEG_PARAMS
    zseg-samplesheet --nextflow-params nextflow_params.json --emit samples.json ${args}
    """

    stub:
    """
    echo '{"samples": []}' > samples.json
    """
}
