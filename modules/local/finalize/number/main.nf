// Consecutive final cell IDs from the per-chunk counts of kept cells; creates labels.zarr (a barrier).
process ZSEG_FINALIZE_NUMBER {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('finalize_number.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-finalize --run '${meta.run}' --session '${meta.session}' --stage number --emit finalize_number.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "finalize:number", "stub": true}' > finalize_number.json
    """
}
