// Counts, halo warnings and timings into run.json; marks the run complete (a barrier).
process ZSEG_FINALIZE_REPORT {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('finalize_report.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-finalize --run '${meta.run}' --session '${meta.session}' --stage report --emit finalize_report.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "finalize:report", "stub": true}' > finalize_report.json
    """
}
