// A small synthetic multiplex slide (DAPI, Membrane, markers) with the exact flows of its cells and
// nuclei (`zseg synth --multiplex`), for -profile test_multiplex. Written into the task folder.
process ZSEG_SYNTH_SLIDE {
    tag "${meta.id} ${shape}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    tuple val(meta), val(shape)

    output:
    tuple val(meta), path('synth/slide.ome.zarr'), path('synth/flows.zarr'), path('synth/nuclear_flows.zarr'), emit: data

    script:
    def args = task.ext.args ?: ''
    """
    zseg-synth synth --multiplex --shape '${shape}' ${args}
    """

    stub:
    """
    mkdir -p synth/slide.ome.zarr synth/flows.zarr synth/nuclear_flows.zarr
    """
}
