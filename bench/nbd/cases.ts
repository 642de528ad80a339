/** What the benchmark runs: the cases, where on the export each one works, and the results' shape. */
import type { FioFigures, FioJob } from './fio.js';
import { GiB, KiB, MiB, type MachineInfo } from './sys.js';

export type Kind = 'randwrite' | 'cachedread' | 'uncachedread' | 'seqwrite';

export interface CaseSpec {
  id: string;
  label: string;
  kind: Kind;
  bs: number;
  iodepth: number;
  numjobs: number;
}

/** The export is 8 GiB; each kind of case has its own region of it. */
export const EXPORT_SIZE = 8 * GiB;
export const REGION = {
  /** 4 KiB random writes. */
  randwrite: { offset: 0, size: 512 * MiB },
  /** Sequential writes (wrapping around within the region when time runs on). */
  seqwrite: { offset: 0, size: 1 * GiB },
  /** Written (primed) just before the cached-read cases. */
  cached: { offset: 1 * GiB, size: 256 * MiB },
  /** Uncached reads: case k reads [2 GiB + k GiB, +1 GiB), data in the backing file, never read before. */
  uncached: (k: number) => ({ offset: 2 * GiB + k * GiB, size: 1 * GiB }),
} as const;
export const MAX_UNCACHED = 6;

function sizeName(bs: number): string {
  return bs >= MiB ? `${bs / MiB}M` : `${bs / KiB}K`;
}

const KIND_LABEL: Record<Kind, string> = {
  randwrite: 'random write',
  cachedread: 'random read, cached',
  uncachedread: 'random read, uncached',
  seqwrite: 'sequential write',
};

export function makeCase(kind: Kind, bs: number, iodepth: number, numjobs: number): CaseSpec {
  return {
    id: `${kind}-${sizeName(bs).toLowerCase()}-qd${iodepth}-j${numjobs}`,
    label: `${sizeName(bs)} ${KIND_LABEL[kind]}, qd${iodepth}, ${numjobs} job${numjobs > 1 ? 's' : ''}`,
    kind,
    bs,
    iodepth,
    numjobs,
  };
}

export interface Plan {
  quick: boolean;
  runtime: number;
  main: CaseSpec[];
  slow: CaseSpec[];
  drainBytes: number;
}

export function makePlan(quick: boolean, runtime: number): Plan {
  const k4 = 4 * KiB;
  const configs4k: Array<[number, number]> = quick
    ? [
        [32, 1],
        [1, 4],
      ]
    : [
        [1, 1],
        [32, 1],
        [1, 4],
        [32, 4],
      ];
  const seqConfigs: Array<[number, number]> = quick ? [[32, 1]] : [
    [1, 1],
    [32, 1],
  ];
  const main: CaseSpec[] = [];
  for (const kind of ['randwrite', 'cachedread', 'uncachedread'] as const) for (const [q, j] of configs4k) main.push(makeCase(kind, k4, q, j));
  for (const bs of [64 * KiB, MiB]) for (const [q, j] of seqConfigs) main.push(makeCase('seqwrite', bs, q, j));
  const slowWrites: Array<[number, number]> = quick
    ? [[32, 1]]
    : [
        [1, 1],
        [32, 1],
      ];
  // Random writes only: priming and flushing a cached region through a 2 ms backing costs a minute.
  const slow: CaseSpec[] = slowWrites.map(([q, j]) => makeCase('randwrite', k4, q, j));
  return { quick, runtime, main, slow, drainBytes: quick ? 128 * MiB : 512 * MiB };
}

/** The fio job for a case; `uncachedIndex` picks the case's fresh region. */
export function jobFor(c: CaseSpec, runtime: number, uncachedIndex: number): FioJob {
  const region =
    c.kind === 'randwrite' ? REGION.randwrite : c.kind === 'seqwrite' ? REGION.seqwrite : c.kind === 'cachedread' ? REGION.cached : REGION.uncached(uncachedIndex);
  return {
    name: c.id,
    rw: c.kind === 'randwrite' ? 'randwrite' : c.kind === 'seqwrite' ? 'write' : 'randread',
    bs: c.bs,
    iodepth: c.iodepth,
    numjobs: c.numjobs,
    offset: region.offset,
    size: region.size,
    runtime,
    // Every server that stores data does the same durability work: the timed run ends with a FLUSH.
    endFsync: c.kind === 'randwrite' || c.kind === 'seqwrite',
  };
}

/** The pass that allocates nbdkit memory's write region, so that its write cases overwrite as the others do. */
export function primeWritesJob(): FioJob {
  return { name: 'prime-write-region', rw: 'write', bs: MiB, iodepth: 32, numjobs: 1, offset: REGION.seqwrite.offset, size: REGION.seqwrite.size, runtime: null };
}

/** One sequential read of the cached region after priming, so that what a cache let go is read back in. */
export function warmJob(): FioJob {
  return { name: 'warm-cached-region', rw: 'read', bs: MiB, iodepth: 32, numjobs: 1, offset: REGION.cached.offset, size: REGION.cached.size, runtime: null };
}

/** The pass that writes the cached region before the cached-read cases. */
export function primeJob(): FioJob {
  return { name: 'prime-cached-region', rw: 'write', bs: MiB, iodepth: 32, numjobs: 1, offset: REGION.cached.offset, size: REGION.cached.size, runtime: null };
}

export type Section = 'main' | 'slow';

export interface CaseResult {
  section: Section;
  caseId: string;
  label: string;
  kind: Kind;
  server: string;
  serverLabel: string;
  fio: FioFigures | null;
  /** Server CPU (user + system) over the case, seconds, and per 100k requests. */
  cpuSeconds: number | null;
  cpuPer100k: number | null;
  /** fio's CPU over the case, seconds. */
  fioCpuSeconds: number | null;
  /** CPU used by everything else on the machine during the case, in cores (a noisy neighbour shows here). */
  otherCores: number | null;
  wallSeconds: number;
  /** pcache's read hits over the case, percent of reads (read cases on pcache only). */
  hitPct: number | null;
  command: string;
  error: string | null;
}

export interface ServerRecord {
  section: Section | 'drain';
  id: string;
  label: string;
  commands: string[];
  error: string | null;
  /**
   * pcache only: the percentage of the primed (written, then flushed) region still in the cache
   * when it was first read back, by bytes.
   */
  primedHitPct?: number | null;
}

export interface DrainResult {
  burstBytes: number;
  burstMiBps: number | null;
  burstSeconds: number | null;
  /** Dirty bytes when the flush began (the rest was written back during the burst). */
  dirtyAtFlush: number | null;
  flushedBytes: number | null;
  flushSeconds: number | null;
  pcacheMiBps: number | null;
  pcacheCpuSeconds: number | null;
  nbdcopySeconds: number | null;
  nbdcopyMiBps: number | null;
  nbdcopyCpuSeconds: number | null;
  backing: string;
  commands: string[];
  error: string | null;
}

export interface Results {
  startedAt: string;
  finishedAt: string;
  machine: MachineInfo;
  argv: string[];
  plan: Plan;
  dir: string;
  cacheSize: number;
  /** How pcache's slow-backing row was backed, and why. */
  slowBackingNote: string;
  servers: ServerRecord[];
  cases: CaseResult[];
  drain: DrainResult | null;
}
