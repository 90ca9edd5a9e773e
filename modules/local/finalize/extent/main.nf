// A slide compartment's flow check: the diffusion steps from the largest cell extent (a barrier; nothing to do on a volume).
process ZSEG_FINALIZE_EXTENT {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('finalize_extent.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-finalize --run '${meta.run}' --session '${meta.session}' --stage extent --emit finalize_extent.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "finalize:extent", "stub": true}' > finalize_extent.json
    """
}
