// A small synthetic volume of touching cells with its exact Cellpose flows (`zseg synth`), for
// -profile test. It is written into the task folder, and the workflow passes on its URI.
process ZSEG_SYNTH {
    tag "${meta.id} ${shape}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    tuple val(meta), val(shape)

    output:
    tuple val(meta), path('synth/image.ome.zarr'), path('synth/flows.zarr'), emit: data

    script:
    def args = task.ext.args ?: ''
    """
    zseg-synth synth --shape '${shape}' ${args}
    """

    stub:
    """
    mkdir -p synth/image.ome.zarr synth/flows.zarr
    """
}
