// Stitch mode (--stitch_threshold): Cellpose's stitch3D over every plane's overlaps, sizes and final IDs of the stitched cells (a barrier; nothing to do otherwise).
process ZSEG_FINALIZE_STITCH {
    tag "${meta.id}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('finalize_stitch.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-finalize --run '${meta.run}' --session '${meta.session}' --stage stitch --emit finalize_stitch.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "finalize:stitch", "stub": true}' > finalize_stitch.json
    """
}
