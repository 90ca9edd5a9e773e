// Each cell's nucleus and output ID, 1..K in ascending cell label (a barrier).
process ZSEG_MATCH_NUMBER {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('match_number.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-match --run '${meta.run}' --session '${meta.session}' --stage number --emit match_number.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "match:number", "stub": true}' > match_number.json
    """
}
