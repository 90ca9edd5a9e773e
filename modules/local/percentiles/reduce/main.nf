// Merge the chunk histograms into exact global intensity percentiles (a barrier).
process ZSEG_PERCENTILES_REDUCE {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('percentiles_reduce.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-percentiles --run '${meta.run}' --session '${meta.session}' --reduce --emit percentiles_reduce.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "percentiles:reduce", "stub": true}' > percentiles_reduce.json
    """
}
