// The flows (dZ, dY, dX, cellprob) of one shard of chunks: sum the partial sums of the predict
// units that reach each core, resize them back to the volume and write the cores into the run's
// flow store (work folder, flows.zarr). CPU only. With precomputed --flows it exits at once.
process ZSEG_PREDICT_COMBINE {
    tag "${meta.id} shard ${index}/${count}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the manifests of every predict unit (a barrier), so -resume re-runs this task when
    // predict did new work. The data itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path("predict_combine.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus}
    zseg-predict --run '${meta.run}' --session '${meta.session}' --stage combine --shard ${index}/${count} --emit predict_combine.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "predict:combine", "shard": "${index}/${count}", "stub": true}' > predict_combine.${index}.json
    """
}
