// A slide's network inputs for one shard of chunks: the membrane composite (raw values combined pixelwise) and the nuclear channel.
process ZSEG_SLIDE_INPUTS {
    tag "${meta.id} shard ${index}/${count}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the manifest(s) of the stage before (a reduce's one file, or every shard of a map
    // stage: a barrier), so -resume re-runs this task when that stage did new work. The data
    // itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path("slide_inputs.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-slide --run '${meta.run}' --session '${meta.session}' --stage inputs --shard ${index}/${count} --emit slide_inputs.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "slide:inputs", "shard": "${index}/${count}", "stub": true}' > slide_inputs.${index}.json
    """
}
