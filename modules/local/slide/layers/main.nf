// The cell, nucleus and cytoplasm layers of one shard of chunks, and their statistics over every channel of the slide.
process ZSEG_SLIDE_LAYERS {
    tag "${meta.id} shard ${index}/${count}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the manifest(s) of the stage before (a reduce's one file, or every shard of a map
    // stage: a barrier), so -resume re-runs this task when that stage did new work. The data
    // itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path("slide_layers.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-slide --run '${meta.run}' --session '${meta.session}' --stage layers --shard ${index}/${count} --emit slide_layers.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "slide:layers", "shard": "${index}/${count}", "stub": true}' > slide_layers.${index}.json
    """
}
