/*
 * The zseg run as Nextflow tasks: plan, then each stage of docs/architecture.md ("Phases and stages") in order, one task per
 * shard of chunks for a map stage and one task for a reduce. A stage starts when every task of
 * the stage before has finished (a barrier): its tasks take that stage's manifests as input.
 *
 * Zarr stores never travel through Nextflow: every task reads and writes the run folder
 * meta.run (a local path or s3:// URI) in place, and emits a small JSON manifest (`--emit`) so
 * that -resume tracks which stages did their work.
 */

include { ZSEG_FINGERPRINT        } from '../modules/local/fingerprint'
include { ZSEG_PLAN               } from '../modules/local/plan'
include { ZSEG_SLIDE_PREPARE      } from './slide'
include { ZSEG_SLIDE_FINISH       } from './slide'
include { ZSEG_PERCENTILES_MAP    } from '../modules/local/percentiles/map'
include { ZSEG_PERCENTILES_REDUCE } from '../modules/local/percentiles/reduce'
include { ZSEG_PREDICT            } from '../modules/local/predict'
include { ZSEG_PREDICT_COMBINE    } from '../modules/local/predict/combine'
include { ZSEG_SEEDS_FOLLOW       } from '../modules/local/seeds/follow'
include { ZSEG_SEEDS_FIND         } from '../modules/local/seeds/find'
include { ZSEG_NUMBER             } from '../modules/local/number'
include { ZSEG_MASKS              } from '../modules/local/masks'
include { ZSEG_MASKS_OWN          } from '../modules/local/masks/own'
include { ZSEG_MASKS_RESIZE       } from '../modules/local/masks/resize'
include { ZSEG_FINALIZE_SIZES     } from '../modules/local/finalize/sizes'
include { ZSEG_FINALIZE_HOLES     } from '../modules/local/finalize/holes'
include { ZSEG_FINALIZE_EXTENT    } from '../modules/local/finalize/extent'
include { ZSEG_FINALIZE_QUALITY   } from '../modules/local/finalize/quality'
include { ZSEG_FINALIZE_OVERLAPS  } from '../modules/local/finalize/overlaps'
include { ZSEG_FINALIZE_STITCH    } from '../modules/local/finalize/stitch'
include { ZSEG_FINALIZE_NUMBER    } from '../modules/local/finalize/number'
include { ZSEG_FINALIZE_LABELS    } from '../modules/local/finalize/labels'
include { ZSEG_FINALIZE_CELLS     } from '../modules/local/finalize/cells'
include { ZSEG_FINALIZE_REPORT    } from '../modules/local/finalize/report'

workflow ZSEG {
    take:
    ch_data     // channel: [ meta, input URI, flows URI or '' (predict computes them) ]; meta.run is the output folder URI
    run_params  // map: the run's params, Nextflow's names (zseg plan reads them; null: zseg's default)
    shard_size  // integer: chunks per map task

    main:
    // the hash of what is stored at the input URIs joins the plan task's inputs: an input replaced
    // at the same URI is planned again (and refused there), never taken for the cached one
    ZSEG_FINGERPRINT(ch_data)
    ch_fingerprinted = ZSEG_FINGERPRINT.out.data.map { meta, input, flows, fp -> [meta, input, flows, readJson(fp).digest] }
    ZSEG_PLAN(ch_fingerprinted, run_params)
    // a 2D slide (plan.json kind "slide") runs its own stages around its compartments, which are
    // one-plane runs of the volume stages: they join the volume runs in ZSEG_STAGES
    ch_kind = ZSEG_PLAN.out.manifest.branch { _meta, plan ->
        slide: readJson(plan).kind == 'slide'
        volume: true
    }
    ZSEG_SLIDE_PREPARE(ch_kind.slide, shard_size)
    ZSEG_STAGES(ch_kind.volume.mix(ZSEG_SLIDE_PREPARE.out.compartments), shard_size)
    ch_done = ZSEG_STAGES.out.report.branch { meta, _report ->
        compartment: meta.slide != null
        volume: true
    }
    ZSEG_SLIDE_FINISH(ch_done.compartment, shard_size)

    emit:
    report = ch_done.volume.mix(ZSEG_SLIDE_FINISH.out.report)  // channel: [ meta, report.json ]
}

workflow ZSEG_STAGES {
    take:
    ch_plan     // channel: [ meta, plan.json ({"nchunks": N, ...}) ]; meta.run is the run folder URI
    shard_size  // integer: chunks per map task

    main:
    // [ meta, index, count ] for each of the count = ceil(nchunks / shard_size) shards
    ch_shards = shards(ch_plan, shard_size)
    // predict runs one task per predict unit (run.json predict.units: fixed by the volume and the
    // network, never by the chunking); the chunks' flows are then combined one shard at a time
    ch_units = units(ch_plan)

    ZSEG_PERCENTILES_MAP(ch_shards.combine(ch_plan, by: 0))
    ZSEG_PERCENTILES_REDUCE(gather(ZSEG_PERCENTILES_MAP.out.manifest))

    ZSEG_PREDICT(ch_units.combine(ZSEG_PERCENTILES_REDUCE.out.manifest, by: 0))
    ZSEG_PREDICT_COMBINE(ch_shards.combine(gather(ZSEG_PREDICT.out.manifest), by: 0))
    ZSEG_SEEDS_FOLLOW(ch_shards.combine(gather(ZSEG_PREDICT_COMBINE.out.manifest), by: 0))
    ZSEG_SEEDS_FIND(ch_shards.combine(gather(ZSEG_SEEDS_FOLLOW.out.manifest), by: 0))
    ZSEG_NUMBER(gather(ZSEG_SEEDS_FIND.out.manifest))

    ZSEG_MASKS(ch_shards.combine(ZSEG_NUMBER.out.manifest, by: 0))
    // --no-resample: the masks were made on the network grid (each stage divides its own grid's
    // chunks into the same count of shards); brought back to the volume's grid here
    ZSEG_MASKS_OWN(gather(ZSEG_MASKS.out.manifest))
    ZSEG_MASKS_RESIZE(ch_shards.combine(ZSEG_MASKS_OWN.out.manifest, by: 0))

    ZSEG_FINALIZE_SIZES(ch_shards.combine(gather(ZSEG_MASKS_RESIZE.out.manifest), by: 0))
    ZSEG_FINALIZE_EXTENT(gather(ZSEG_FINALIZE_SIZES.out.manifest))
    ZSEG_FINALIZE_QUALITY(ch_shards.combine(ZSEG_FINALIZE_EXTENT.out.manifest, by: 0))
    ZSEG_FINALIZE_HOLES(ch_shards.combine(gather(ZSEG_FINALIZE_QUALITY.out.manifest), by: 0))
    ZSEG_FINALIZE_OVERLAPS(ch_shards.combine(gather(ZSEG_FINALIZE_HOLES.out.manifest), by: 0))
    ZSEG_FINALIZE_STITCH(gather(ZSEG_FINALIZE_OVERLAPS.out.manifest))
    ZSEG_FINALIZE_NUMBER(ZSEG_FINALIZE_STITCH.out.manifest)
    ZSEG_FINALIZE_LABELS(ch_shards.combine(ZSEG_FINALIZE_NUMBER.out.manifest, by: 0))
    ZSEG_FINALIZE_CELLS(ch_shards.combine(gather(ZSEG_FINALIZE_LABELS.out.manifest), by: 0))
    ZSEG_FINALIZE_REPORT(gather(ZSEG_FINALIZE_CELLS.out.manifest))

    emit:
    report = ZSEG_FINALIZE_REPORT.out.manifest  // channel: [ meta, finalize_report.json ]
}

// [ meta, index, count ] for each of the count = ceil(nchunks / shard_size) shards of a run
// whose plan (or any manifest with "nchunks") is given.
def shards(ch_plan, shard_size) {
    return ch_plan.flatMap { meta, plan ->
        def nchunks = readJson(plan).nchunks as Integer
        def count = (nchunks + shard_size - 1).intdiv(shard_size)
        (0..<count).collect { index -> [meta, index, count] }
    }
}

// [ meta, index, count ] for each of a run's predict units (at least one task: with --flows the
// predict tasks have nothing to do and exit at once). A slide's compartment finds its own count
// in its entry of the compartments' manifest.
def units(ch_plan) {
    return ch_plan.flatMap { meta, plan ->
        def json = readJson(plan)
        def own = json.compartments ? json.compartments.find { c -> c.run == meta.run } : json
        def count = Math.max(1, (own.npredict ?: 0) as Integer)
        (0..<count).collect { index -> [meta, index, count] }
    }
}

def readJson(plan) {
    return new groovy.json.JsonSlurper().parseText(plan.text)
}

// All manifests of a map stage as [ meta, [ manifests ] ], once every shard has finished. The
// files are sorted by name so that the next task's inputs (and its -resume hash) do not depend
// on the order in which the shards finished.
def gather(ch) {
    return ch.groupTuple(by: 0, sort: { a, b -> a.name <=> b.name })
}
