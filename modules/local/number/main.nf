// Global seed IDs from the per-chunk seed counts (a barrier).
process ZSEG_NUMBER {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('number.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-number --run '${meta.run}' --session '${meta.session}' --emit number.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "number", "stub": true}' > number.json
    """
}
