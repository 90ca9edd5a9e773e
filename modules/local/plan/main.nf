// Validate the input and the parameters (and, without flows, find and check the network), fix the
// chunk grid and write RUN/run.json; emits plan.json ({"run": ..., "nchunks": N, "grid": {...}}),
// from which the workflow makes the shards.
process ZSEG_PLAN {
    tag "${meta.id}"
    label 'process_low'
    containerOptions "${meta.container_options}"

    input:
    // flows: a precomputed flow store, or '' when the predict stage computes them
    tuple val(meta), val(input), val(flows)
    val run_params

    output:
    tuple val(meta), path('plan.json'), emit: manifest

    script:
    def args = task.ext.args ?: ''
    def flows_flag = flows ? "--flows '${flows}'" : ''
    """
    zseg plan '${input}' '${meta.run}' ${flows_flag} ${planFlags(run_params)} --check-model --emit plan.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "nchunks": 8, "grid": {}, "stub": true}' > plan.json
    """
}

// RunParams values as `zseg plan` flags, each the field's name in kebab case: a list becomes
// "a,b,c", a boolean --name or --no-name; null values are left out, so zseg's defaults apply.
def planFlags(Map values) {
    return values
        .findAll { _name, value -> value != null }
        .collect { name, value -> planFlag(name, value) }
        .join(' ')
}

def planFlag(String name, value) {
    def flag = '--' + name.replace('_', '-')
    if (value instanceof Boolean) {
        return value ? flag : '--no-' + flag.substring(2)
    }
    def text = value instanceof List ? value.join(',') : value.toString()
    return flag + " '" + text.replace("'", "'\\''") + "'"
}
