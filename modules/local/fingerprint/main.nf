// One hash of everything stored at the run's input and flows URIs (one listing each). Never cached:
// it runs on every launch, and the plan task takes the hash as an input, so an input replaced at
// the same URI makes -resume plan again (and the plan refuses a run folder planned from the old
// input) instead of taking the cached plan for it.
process ZSEG_FINGERPRINT {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"
    cache false

    input:
    tuple val(meta), val(input), val(flows)

    output:
    tuple val(meta), val(input), val(flows), path('fingerprint.json'), emit: data

    script:
    def args = task.ext.args ?: ''
    """
    zseg-fingerprint '${input}' '${flows}' --emit fingerprint.json ${args}
    """

    stub:
    """
    echo '{"digest": "stub", "stores": {}}' > fingerprint.json
    """
}
