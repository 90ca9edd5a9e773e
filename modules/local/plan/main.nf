// Validate the input and the parameters (and, without flows, find and check the network), fix the
// chunk grid and write RUN/run.json; emits plan.json ({"run": ..., "nchunks": N, "grid": {...}}),
// from which the workflow makes the shards. run_params are the run's params as Nextflow has them,
// with launch_dir, the folder relative paths are relative to.
process ZSEG_PLAN {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // flows: a precomputed flow store, or '' when the predict stage computes them; fingerprint:
    // the hash of what is stored at input and flows (ZSEG_FINGERPRINT), here for -resume only
    tuple val(meta), val(input), val(flows), val(fingerprint)
    val run_params

    output:
    tuple val(meta), path('plan.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    // The parameters travel as one line of JSON in a quoted here-document: no flag is built and
    // nothing is quoted here (JSON escapes line breaks, so no line can end the document early).
    // (a samplesheet's row: its image, flows, output and work folders replace the run's)
    // (a synthetic slide: its nuclear flows come with the meta)
    def values = run_params + [input: input, flows: flows ?: null, outdir: meta.run] + (meta.work ? [work: meta.work] : [:]) +
        (meta.nuclear_flows ? [nuclear_flows: meta.nuclear_flows] : [:])
    def json = groovy.json.JsonOutput.toJson(values)
    """
    cat > nextflow_params.json <<'ZSEG_PARAMS'
    ${json}
    ZSEG_PARAMS
    zseg-plan --nextflow-params nextflow_params.json --session '${meta.session}' --check-model --emit plan.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "nchunks": 8, "grid": {}, "stub": true}' > plan.json
    """
}
