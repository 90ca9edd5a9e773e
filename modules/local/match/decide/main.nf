// Cell-nucleus matching: the components of the overlap graph that one shard of chunks owns.
process ZSEG_MATCH_DECIDE {
    tag "${meta.id} shard ${index}/${count}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the report of each compartment (whole cells, nuclei), so -resume re-runs this task
    // when a compartment did new work; both are called finalize_report.json, hence a folder each.
    // The data itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/?/*')

    output:
    tuple val(meta), path("match_decide.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-match --run '${meta.run}' --session '${meta.session}' --stage decide --shard ${index}/${count} --emit match_decide.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "match:decide", "shard": "${index}/${count}", "stub": true}' > match_decide.${index}.json
    """
}
