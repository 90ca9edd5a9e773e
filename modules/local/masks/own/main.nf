// --no-resample runs: each network-scale seed's owner chunk of the volume's grid and its ID there (a barrier; exits at once otherwise).
process ZSEG_MASKS_OWN {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('masks_own.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-masks --run '${meta.run}' --session '${meta.session}' --stage own --emit masks_own.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "masks:own", "stub": true}' > masks_own.json
    """
}
