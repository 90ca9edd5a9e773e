// A slide's pyramids, cells.parquet (and cells.h5ad, cells.geojson), the QC report and run.json (a barrier).
process ZSEG_SLIDE_REPORT {
    tag "${meta.id}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: manifests of every shard of the map stage before (a barrier).
    tuple val(meta), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path('slide_report.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-slide --run '${meta.run}' --session '${meta.session}' --stage report --emit slide_report.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "slide:report", "stub": true}' > slide_report.json
    """
}
