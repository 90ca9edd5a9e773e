// Plan a slide's compartments (whole cells, nuclei), each a one-plane run of the volume stages; finds and checks their networks (a barrier).
process ZSEG_SLIDE_COMPARTMENTS {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('slide_compartments.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-slide --run '${meta.run}' --session '${meta.session}' --stage compartments --emit slide_compartments.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "slide:compartments", "stub": true}' > slide_compartments.json
    """
}
