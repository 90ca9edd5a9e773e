/*
 * A 2D multiplex slide as Nextflow tasks (docs/architecture.md, "Multiplex slides"): its network
 * inputs and the planning of its compartments (ZSEG_SLIDE_PREPARE); the compartments, one-plane
 * runs of the volume stages, run in ZSEG_STAGES beside any volume; then matching, the output
 * layers and the report (ZSEG_SLIDE_FINISH). One task per shard of chunks for a map stage, one
 * task for a reduce, each stage after every task of the one before (a barrier).
 */

include { ZSEG_SLIDE_INPUTS       } from '../modules/local/slide/inputs'
include { ZSEG_SLIDE_COMPARTMENTS } from '../modules/local/slide/compartments'
include { ZSEG_MATCH_DECIDE       } from '../modules/local/match/decide'
include { ZSEG_MATCH_NUMBER       } from '../modules/local/match/number'
include { ZSEG_SLIDE_LAYERS       } from '../modules/local/slide/layers'
include { ZSEG_SLIDE_REPORT       } from '../modules/local/slide/report'

workflow ZSEG_SLIDE_PREPARE {
    take:
    ch_plan     // channel: [ meta, plan.json ] of slide runs; meta.run is the slide's output folder
    shard_size  // integer: chunks per map task

    main:
    ch_shards = slideShards(ch_plan, shard_size)
    ZSEG_SLIDE_INPUTS(ch_shards.combine(ch_plan, by: 0))
    ZSEG_SLIDE_COMPARTMENTS(gatherSlide(ZSEG_SLIDE_INPUTS.out.manifest))

    // each compartment as a run of its own: [ meta + (its run folder, its slide), manifest with nchunks ]
    ch_compartments = ZSEG_SLIDE_COMPARTMENTS.out.manifest.flatMap { meta, manifest ->
        def result = new groovy.json.JsonSlurper().parseText(manifest.text).result
        result.compartments.collect { c ->
            [meta + [id: "${meta.id}/${c.name}", run: c.run, slide: meta, compartments: result.compartments.size()], manifest]
        }
    }

    emit:
    compartments = ch_compartments  // channel: [ meta of a compartment, slide_compartments.json ]
}

workflow ZSEG_SLIDE_FINISH {
    take:
    ch_reports  // channel: [ meta of a compartment, its finalize_report.json ], every compartment of each slide
    shard_size  // integer: chunks per map task

    main:
    // a slide goes on when all its compartments are done: [ slide meta, [ their reports ] ]
    ch_done = ch_reports
        .map { meta, report -> [groupKey(meta.slide, meta.compartments), report] }
        .groupTuple(sort: { a, b -> a.name <=> b.name })
        .map { key, reports -> [key.getGroupTarget(), reports] }
    ch_shards = slideShards(ch_done.map { meta, reports -> [meta, reports[0]] }, shard_size)

    ZSEG_MATCH_DECIDE(ch_shards.combine(ch_done, by: 0))
    ZSEG_MATCH_NUMBER(gatherSlide(ZSEG_MATCH_DECIDE.out.manifest))
    ZSEG_SLIDE_LAYERS(ch_shards.combine(ZSEG_MATCH_NUMBER.out.manifest, by: 0))
    ZSEG_SLIDE_REPORT(gatherSlide(ZSEG_SLIDE_LAYERS.out.manifest))

    emit:
    report = ZSEG_SLIDE_REPORT.out.manifest  // channel: [ meta, slide_report.json ]
}

// [ meta, index, count ] for the shards of a run whose manifest says "nchunks".
def slideShards(ch, shard_size) {
    return ch.flatMap { meta, manifest ->
        def nchunks = new groovy.json.JsonSlurper().parseText(manifest.text).nchunks as Integer
        def count = (nchunks + shard_size - 1).intdiv(shard_size)
        (0..<count).collect { index -> [meta, index, count] }
    }
}

// All manifests of a map stage as [ meta, [ manifests ] ] once every shard has finished, sorted by name.
def gatherSlide(ch) {
    return ch.groupTuple(by: 0, sort: { a, b -> a.name <=> b.name })
}
