/**
 * pcache in front of Ceph RBD: a one-node cluster (bench/ceph/cluster.ts) in a temporary
 * directory, its image exported by qemu-nbd, and pcache's benchmark cases (bench/nbd) run with fio's
 * nbd engine against RBD alone, pcache in front of RBD, and RBD with librbd's in-memory cache; then
 * the cache-full cases and the write-back drain. Writes the "Ceph RBD" section of BENCHMARKS.md
 * and bench/ceph/results.json.
 *
 *   node --import tsx bench/ceph/run.ts [--quick] [--runtime S] [--cache-size SIZE] [--fill-seconds S]
 *                                       [--drain-size SIZE] [--dir DIR] [--md FILE] [--json FILE]
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { jobFor, makeCase, primeJob, warmJob, type CaseSpec } from '../nbd/cases.js';
import { fioCommand, runFio, type FioFigures, type FioJob } from '../nbd/fio.js';
import { pcacheFlush, pcacheStats, startPcache, type Server } from '../nbd/servers.js';
import { children, cpuSeconds, GiB, KiB, loadAverage, machineInfo, MiB, parseSize, run, sleep, sparseFile, type MachineInfo } from '../nbd/sys.js';
import { cephMissing, startCluster, type CephCluster } from './cluster.js';

const REPO = fileURLToPath(new URL('../../', import.meta.url));
const HERE = fileURLToPath(new URL('./', import.meta.url));
const SECTION = '## Ceph RBD';

const HELP = `usage: npm run bench:ceph -- [options]

Bring up a one-node Ceph cluster in a temporary directory, export an RBD image with qemu-nbd, and
run fio (nbd engine) against RBD alone, pcache (fresh cache device) in front of RBD, and RBD with
librbd's in-memory cache; then cache-full cases and the write-back drain. Installs nothing: it says
which Debian packages are missing. Writes the "${SECTION.slice(3)}" section of BENCHMARKS.md.

  --quick              3 s per case, a 1 GiB cache, short fill and drain: a harness check
                       (written to bench/ceph/out/)
  --runtime S          seconds per case (default 10)
  --cache-size SIZE    pcache's cache device (default 2G)
  --fill-seconds S     at most this long filling the cache before the cache-full cases (default 90)
  --drain-size SIZE    dirty 4 KiB random data written before the timed flush (default 256M)
  --dir DIR            where the temporary directory goes (default: ${tmpdir()})
  --md FILE            the report (default BENCHMARKS.md; bench/ceph/out/BENCHMARKS.md with --quick)
  --json FILE          raw results (default bench/ceph/results.json, or bench/ceph/out/)
  --render FILE        run nothing: write the section again from a results.json of an earlier run
`;

interface Options {
  quick: boolean;
  runtime: number;
  cacheSize: number;
  fillSeconds: number;
  drainBytes: number;
  dir: string;
  md: string;
  json: string;
  render: string | null;
}

function wholeSeconds(text: string | undefined, fallback: number, name: string): number {
  const n = text === undefined ? fallback : Number(text);
  if (!Number.isInteger(n) || n < 1) throw new Error(`${name} takes whole seconds, not '${text}'`);
  return n;
}

function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      runtime: { type: 'string' },
      'cache-size': { type: 'string' },
      'fill-seconds': { type: 'string' },
      'drain-size': { type: 'string' },
      dir: { type: 'string' },
      md: { type: 'string' },
      json: { type: 'string' },
      render: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(HELP);
    return null;
  }
  const quick = values.quick ?? false;
  const cacheSize = parseSize(values['cache-size'] ?? (quick ? '1G' : '2G'));
  if (cacheSize < 512 * MiB) throw new Error('--cache-size must be at least 512M');
  const drainBytes = parseSize(values['drain-size'] ?? (quick ? '32M' : '256M'));
  if (drainBytes < MiB || drainBytes > DRAIN_REGION.size) throw new Error(`--drain-size must be between 1M and ${DRAIN_REGION.size / MiB}M`);
  const out = join(HERE, 'out');
  return {
    quick,
    runtime: wholeSeconds(values.runtime, quick ? 3 : 10, '--runtime'),
    cacheSize,
    fillSeconds: wholeSeconds(values['fill-seconds'], quick ? 10 : 90, '--fill-seconds'),
    drainBytes,
    dir: resolve(values.dir ?? tmpdir()),
    md: resolve(values.md ?? (quick ? join(out, 'BENCHMARKS.md') : join(REPO, 'BENCHMARKS.md'))),
    json: resolve(values.json ?? (quick ? join(out, 'results.json') : join(HERE, 'results.json'))),
    render: values.render === undefined ? null : resolve(values.render),
  };
}

// ---- where on the 8 GiB image each phase works (bench/nbd's regions below 2 GiB) ----

const IMAGE_SIZE = 8 * GiB;
/** The cache-full fill: 4 KiB random writes over a region as large as the cache, each block once. */
const FILL_OFFSET = 2 * GiB;
const DRAIN_REGION = { offset: 6 * GiB, size: 2 * GiB };

type Phase = 'empty' | 'full';

interface Step {
  caseSpec: CaseSpec;
  phase: Phase;
}

const EMPTY_CASES = (quick: boolean): CaseSpec[] =>
  quick
    ? [makeCase('randwrite', 4 * KiB, 32, 1), makeCase('seqwrite', MiB, 32, 1), makeCase('cachedread', 4 * KiB, 32, 1)]
    : [makeCase('randwrite', 4 * KiB, 1, 1), makeCase('randwrite', 4 * KiB, 32, 1), makeCase('seqwrite', MiB, 32, 1), makeCase('cachedread', 4 * KiB, 32, 1)];
const FULL_CASES: CaseSpec[] = [makeCase('seqwrite', MiB, 32, 1), makeCase('randwrite', 4 * KiB, 32, 1)];

function isWrite(c: CaseSpec): boolean {
  return c.kind === 'randwrite' || c.kind === 'seqwrite';
}

/** A case's fio job: bench/nbd's, with a flush at the end of every write case, inside the measured time. */
function caseJob(c: CaseSpec, runtime: number): FioJob {
  return { ...jobFor(c, runtime, 0), endFsync: isWrite(c) };
}

function fillJob(cacheSize: number, seconds: number): FioJob {
  // Each block once, or until the time is up, whichever comes first.
  return { name: 'fill-cache', rw: 'randwrite', bs: 4 * KiB, iodepth: 32, numjobs: 1, offset: FILL_OFFSET, size: cacheSize, runtime: null, capSeconds: seconds, endFsync: true };
}

function drainJob(bytes: number): FioJob {
  return { name: 'drain-burst', rw: 'randwrite', bs: 4 * KiB, iodepth: 32, numjobs: 1, offset: DRAIN_REGION.offset, size: bytes, runtime: null, endFsync: true };
}

// ---- results ----

interface CacheFill {
  /** pcache only: segments in use and dirty bytes when the case began. */
  segsUsed: number;
  segNum: number;
  dirtyBytes: number;
}

interface CephCase {
  caseId: string;
  label: string;
  phase: Phase;
  server: ServerId;
  fio: FioFigures | null;
  cpuSeconds: number | null;
  pcacheAtStart: CacheFill | null;
  command: string;
  error: string | null;
}

interface FillResult {
  server: ServerId;
  fio: FioFigures | null;
  pcacheAfter: CacheFill | null;
  command: string;
  error: string | null;
}

interface DrainResult {
  burstBytes: number;
  burstMiBps: number | null;
  dirtyAtFlush: number | null;
  flushedBytes: number | null;
  flushSeconds: number | null;
  keysPerSecond: number | null;
  commands: string[];
  error: string | null;
}

interface CephResults {
  startedAt: string;
  finishedAt: string;
  machine: MachineInfo;
  ceph: string;
  qemuNbd: string;
  argv: string[];
  runtime: number;
  cacheSize: number;
  imageSize: number;
  fillSeconds: number;
  bootstrapSeconds: number;
  /** The temporary directory, written as $DIR in the report's commands. */
  dirPrefix: string;
  servers: Array<{ id: ServerId; label: string; commands: string[] }>;
  cases: CephCase[];
  fills: FillResult[];
  drain: DrainResult | null;
}

type ServerId = 'rbd' | 'pcache' | 'rbd-cache';

const SERVERS: Array<{ id: ServerId; label: string }> = [
  { id: 'rbd', label: 'RBD (qemu-nbd, cache=none)' },
  { id: 'pcache', label: 'pcache -> RBD' },
  { id: 'rbd-cache', label: 'RBD + librbd cache (volatile)' },
];

// ---- the run ----

const runStart = performance.now();

function log(text: string): void {
  const s = (performance.now() - runStart) / 1000;
  process.stderr.write(`${String(Math.floor(s / 60)).padStart(2, '0')}:${(s % 60).toFixed(0).padStart(2, '0')} ${text}\n`);
}

function fmt(n: number, digits = 0): string {
  return n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

interface Ctx {
  opts: Options;
  tmp: string;
  runDir: string;
  cluster: CephCluster;
  results: CephResults;
}

/** Start one of the three servers; pcache on a fresh cache device each time. */
async function startServer(ctx: Ctx, id: ServerId, tag: string): Promise<Server> {
  const label = SERVERS.find((s) => s.id === id)!.label;
  if (id === 'rbd') return ctx.cluster.exportImage({ id, label, socket: join(ctx.tmp, 'rbd.sock') });
  if (id === 'rbd-cache') return ctx.cluster.exportImage({ id, label, socket: join(ctx.tmp, 'rbd-cache.sock'), rbdCache: true });
  const below = await ctx.cluster.exportImage({ id: 'pcache-below', label: 'RBD under pcache', socket: join(ctx.tmp, 'pcache-below.sock') });
  const cacheDev = join(ctx.tmp, `cache-${tag}.img`);
  await fsp.rm(cacheDev, { force: true });
  await sparseFile(cacheDev, ctx.opts.cacheSize);
  return startPcache({
    id,
    label,
    repo: REPO,
    socket: join(ctx.tmp, 'pcache.sock'),
    cacheDev,
    backingDev: below.uri,
    backingFiles: [],
    below,
    runDir: ctx.runDir,
    log: join(ctx.tmp, `pcache-${tag}.log`),
  });
}

async function cacheFill(server: Server): Promise<CacheFill | null> {
  if (!server.cacheDev) return null;
  const s = await pcacheStats(server.cacheDev);
  return { segsUsed: s.segsUsed, segNum: s.segNum, dirtyBytes: s.dirtyBytes };
}

function recordServer(ctx: Ctx, server: Server): void {
  if (!ctx.results.servers.some((s) => s.id === server.id)) ctx.results.servers.push({ id: server.id as ServerId, label: server.label, commands: server.commands });
}

async function measure(ctx: Ctx, server: Server, step: Step): Promise<CephCase> {
  const c = step.caseSpec;
  const job = caseJob(c, ctx.opts.runtime);
  const out = join(ctx.tmp, `fio-${server.id}-${step.phase}-${c.id}.json`);
  const res: CephCase = {
    caseId: c.id,
    label: c.label,
    phase: step.phase,
    server: server.id as ServerId,
    fio: null,
    cpuSeconds: null,
    pcacheAtStart: null,
    command: fioCommand(job, server.uri, out),
    error: null,
  };
  try {
    if (c.kind === 'cachedread') {
      // bench/nbd's priming: write the region, write back, read it once, so the case measures hits.
      await runFio({ ...primeJob(), endFsync: true }, server.uri, join(ctx.tmp, `fio-${server.id}-prime.json`));
      if (server.cacheDev) await pcacheFlush(server.cacheDev);
      await runFio(warmJob(), server.uri, join(ctx.tmp, `fio-${server.id}-warm.json`));
    }
    res.pcacheAtStart = await cacheFill(server);
    const pids = server.pids();
    const cpu0 = cpuSeconds(pids);
    res.fio = await runFio(job, server.uri, out);
    res.cpuSeconds = cpuSeconds(pids) - cpu0;
    const lat = (ns: number): string => (ns >= 1e6 ? `${fmt(ns / 1e6, 2)} ms` : `${fmt(ns / 1e3, 0)} µs`);
    log(`${server.id.padEnd(9)} ${step.phase === 'full' ? '[full] ' : ''}${c.label}: ${fmt(res.fio.iops)} IOPS, ${fmt(res.fio.mibps, 1)} MiB/s, mean ${lat(res.fio.meanLatNs)}, p99 ${lat(res.fio.p99LatNs)}`);
  } catch (err) {
    res.error = errText(err);
    log(`${server.id} ${c.label}: ERROR ${res.error}`);
  }
  return res;
}

/** Fill the cache (the same writes on every server), so that the next cases meet a full cache. */
async function fill(ctx: Ctx, server: Server): Promise<void> {
  const job = fillJob(ctx.opts.cacheSize, ctx.opts.fillSeconds);
  const out = join(ctx.tmp, `fio-${server.id}-fill.json`);
  const res: FillResult = { server: server.id as ServerId, fio: null, pcacheAfter: null, command: fioCommand(job, server.uri, out), error: null };
  try {
    res.fio = await runFio(job, server.uri, out);
    res.pcacheAfter = await cacheFill(server);
    const full = res.pcacheAfter ? `; pcache ${fmt((res.pcacheAfter.segsUsed / res.pcacheAfter.segNum) * 100, 0)}% of segments used, ${fmt(res.pcacheAfter.dirtyBytes / MiB, 0)} MiB dirty` : '';
    log(`${server.id.padEnd(9)} fill: ${fmt((res.fio.ios * 4 * KiB) / MiB, 0)} MiB of 4K random writes in ${fmt(res.fio.seconds, 1)} s${full}`);
  } catch (err) {
    res.error = errText(err);
    log(`${server.id} fill: ERROR ${res.error}`);
  }
  ctx.results.fills.push(res);
}

async function runServer(ctx: Ctx, id: ServerId): Promise<void> {
  const steps: Step[] = [...EMPTY_CASES(ctx.opts.quick).map((c) => ({ caseSpec: c, phase: 'empty' as const })), ...FULL_CASES.map((c) => ({ caseSpec: c, phase: 'full' as const }))];
  // pcache: a fresh cache device for every empty-cache case (writing back 4 KiB random writes
  // between cases would take minutes) and one for the fill and the cache-full cases. RBD and librbd:
  // one export takes everything, in the same order.
  const groups: Step[][] = id === 'pcache' ? [...steps.filter((s) => s.phase === 'empty').map((s) => [s]), steps.filter((s) => s.phase === 'full')] : [steps];
  for (const [g, group] of groups.entries()) {
    log(`-- ${id}: starting${id === 'pcache' ? ` (fresh ${ctx.opts.cacheSize / GiB} GiB cache device)` : ''}`);
    let server: Server;
    try {
      server = await startServer(ctx, id, String(g));
    } catch (err) {
      log(`-- ${id} did not start: ${errText(err)}`);
      for (const s of group) ctx.results.cases.push({ caseId: s.caseSpec.id, label: s.caseSpec.label, phase: s.phase, server: id, fio: null, cpuSeconds: null, pcacheAtStart: null, command: '', error: `did not start: ${errText(err).split('\n')[0]}` });
      continue;
    }
    recordServer(ctx, server);
    try {
      for (const [i, step] of group.entries()) {
        if (step.phase === 'full' && (i === 0 || group[i - 1]!.phase !== 'full')) await fill(ctx, server);
        ctx.results.cases.push(await measure(ctx, server, step));
      }
    } finally {
      await server.stop().catch((err) => log(`-- ${id}: stop failed: ${errText(err)}`));
    }
  }
}

/** A fresh pcache takes a known amount of 4 KiB random writes; then `pcache flush` is timed. */
async function runDrain(ctx: Ctx): Promise<DrainResult> {
  const bytes = ctx.opts.drainBytes;
  const res: DrainResult = { burstBytes: bytes, burstMiBps: null, dirtyAtFlush: null, flushedBytes: null, flushSeconds: null, keysPerSecond: null, commands: [], error: null };
  log(`-- drain: ${bytes / MiB} MiB of 4K random writes into a fresh pcache, then pcache flush`);
  let server: Server | null = null;
  try {
    server = await startServer(ctx, 'pcache', 'drain');
    res.commands.push(...server.commands);
    const job = drainJob(bytes);
    const out = join(ctx.tmp, 'fio-drain.json');
    res.commands.push(fioCommand(job, server.uri, out));
    const burst = await runFio(job, server.uri, out);
    res.burstMiBps = burst.mibps;
    const s0 = await pcacheStats(server.cacheDev!);
    const t0 = performance.now();
    await pcacheFlush(server.cacheDev!);
    res.flushSeconds = (performance.now() - t0) / 1000;
    const s1 = await pcacheStats(server.cacheDev!);
    res.dirtyAtFlush = s0.dirtyBytes;
    res.flushedBytes = s1.writtenBackBytes - s0.writtenBackBytes;
    res.keysPerSecond = res.flushedBytes / (4 * KiB) / res.flushSeconds;
    res.commands.push(`pcache flush ${server.cacheDev} (the control request, timed in the benchmark process)`);
    log(`   ${fmt(s0.dirtyBytes / MiB, 1)} MiB dirty at the flush; ${fmt(res.flushedBytes / MiB, 1)} MiB written back in ${fmt(res.flushSeconds, 1)} s = ${fmt(res.keysPerSecond)} keys/s`);
  } catch (err) {
    res.error = errText(err);
    log(`   drain ERROR ${res.error}`);
  } finally {
    await server?.stop().catch(() => undefined);
  }
  return res;
}

// ---- the report ----

function byCase(r: CephResults, phase: Phase, caseId: string, server: ServerId): CephCase | undefined {
  return r.cases.find((c) => c.phase === phase && c.caseId === caseId && c.server === server);
}

function ratio(a: number | undefined, b: number | undefined): string {
  if (a === undefined || b === undefined || b === 0) return '';
  const x = a / b;
  return `${x >= 10 ? fmt(x, 1) : fmt(x, 2)}x`;
}

function latText(ns: number): string {
  return ns >= 1e6 ? `${fmt(ns / 1e6, 2)} ms` : `${fmt(ns / 1e3, 0)} µs`;
}

function rows(r: CephResults): Array<{ phase: Phase; c: { id: string; label: string } }> {
  const seen = new Set<string>();
  const out: Array<{ phase: Phase; c: { id: string; label: string } }> = [];
  for (const c of r.cases) {
    const key = `${c.phase}/${c.caseId}`;
    if (seen.has(key)) continue;
    seen.add(key);
    out.push({ phase: c.phase, c: { id: c.caseId, label: c.label } });
  }
  return out.sort((a, b) => (a.phase === b.phase ? 0 : a.phase === 'empty' ? -1 : 1));
}

function rowLabel(phase: Phase, label: string): string {
  return phase === 'full' ? `${label}, **cache full**` : label;
}

export function renderSection(r: CephResults): string {
  const L: string[] = [];
  const when = `${r.startedAt.slice(0, 16).replace('T', ' ')} to ${r.finishedAt.slice(11, 16)} UTC`;
  const m = r.machine;
  L.push(SECTION, '');
  L.push(
    `Written by \`npm run bench:ceph\` (bench/ceph/run.ts${r.argv.length ? ` ${r.argv.join(' ')}` : ''}), ${when}, pcache at commit ${m.gitCommit}${m.gitDirty ? ' (with uncommitted changes)' : ''}; ` +
      'the raw figures are in bench/ceph/results.json. Rerun with `npm run bench:ceph` (it rewrites only this section; installs nothing, and says which Debian packages are missing) ' +
      'or `npm run bench:ceph -- --quick` (a harness check, written to bench/ceph/out/).',
    '',
  );
  L.push(
    `**Taken on a shared, loaded machine** (${m.cpus} cores, ${m.memGiB} GiB, other engineers' builds and tests running alongside; load average ${m.loadAtStart} at the start, ${m.loadAtEnd} at the end). ` +
      'Only the ratios between servers measured in this one run mean anything; the absolute figures are noisy and would differ on another run.',
    '',
  );
  L.push('### Set-up', '');
  L.push(
    `- ${r.ceph}, from Debian's packages: one mon and one bluestore OSD on a sparse 20 GiB file, in a temporary directory on ${m.filesystem}; pool size 1, ` +
      '`bluestore_cache_size` 256 MiB (no autotune), `osd_memory_target` 1 GiB; bootstrap took ' +
      `${fmt(r.bootstrapSeconds, 0)} s (bench/ceph/cluster.ts, shared with test/ceph). An ${r.imageSize / GiB} GiB image with layering and exclusive-lock.`,
    `- ${r.qemuNbd}; fio ${m.fio.replace(/^fio-/, '')} with its nbd engine on unix sockets; Node ${m.node}. One server at a time (two librbd clients would fight over the exclusive lock).`,
    '- The three servers:',
    '  - **RBD**: `qemu-nbd -f raw --cache=none` of `rbd:rbd/img:conf=...:id=admin` (qemu sets `rbd_cache=false`).',
    `  - **pcache -> RBD**: \`pcache serve\` with a ${r.cacheSize / GiB} GiB cache device (a sparse file, fresh for each empty-cache case, for the cache-full cases and for the drain) and that same qemu-nbd export as its backing device (\`nbd+unix:///?socket=...\`).`,
    '  - **RBD + librbd cache**: `qemu-nbd --cache=writeback` with `:rbd_cache=true:rbd_cache_writethrough_until_flush=false` in the rbd: file name: librbd\'s in-memory write-back cache (32 MiB by default). It is volatile: what it holds is lost if the process dies before a flush. pcache\'s cache is persistent. (librbd\'s persistent PWL cache cannot be compared: Debian ships no `libceph_librbd_pwl_cache.so`.)',
    `- Every write case ends with \`fio --end_fsync=1\`, an NBD flush inside the measured time, on every server: the same durability work on each side (pcache: durable in its cache device; RBD: durable in the OSD; librbd cache: written to the OSD). ${r.runtime} s per case. Latency is fio's total latency, mean and 99th percentile.`,
    '- Cached reads: bench/nbd\'s priming on every server (256 MiB written with 1 MiB writes, written back, read once), then 4 KiB random reads of it. bench/nbd\'s uncached-read cases are left out: an RBD region never written reads as zeros without touching the OSD, so they would measure nothing.',
    `- Cache full: the same fill on every server, 4 KiB random writes qd32 over a region as large as pcache's cache (${r.cacheSize / GiB} GiB, each block once), stopped after ${r.fillSeconds} s if not done; then the cache-full cases with no pause: pcache's cache holds dirty 4 KiB keys (how full it was is under the tables), and new writes wait for write-back to free segments.`,
    '',
  );

  const servers: ServerId[] = ['rbd', 'pcache', 'rbd-cache'];
  L.push('### Throughput', '');
  L.push('| case | RBD | pcache -> RBD | RBD + librbd cache | pcache ÷ RBD | pcache ÷ librbd cache |', '|---|---:|---:|---:|---:|---:|');
  for (const { phase, c } of rows(r)) {
    const got = servers.map((s) => byCase(r, phase, c.id, s));
    const seq = c.id.startsWith('seqwrite');
    const val = (x: CephCase | undefined): number | undefined => (x?.fio ? (seq ? x.fio.mibps : x.fio.iops) : undefined);
    const cell = (x: CephCase | undefined): string => (x?.fio ? (seq ? `${fmt(x.fio.mibps, 1)} MiB/s` : `${fmt(x.fio.iops)} IOPS`) : x?.error ? 'error' : '');
    L.push(`| ${rowLabel(phase, c.label)} | ${got.map(cell).join(' | ')} | ${ratio(val(got[1]), val(got[0]))} | ${ratio(val(got[1]), val(got[2]))} |`);
  }
  L.push('', 'Above 1 is better for pcache.', '');
  L.push('### Latency (mean / p99)', '');
  L.push('| case | RBD | pcache -> RBD | RBD + librbd cache | pcache ÷ RBD, mean | pcache ÷ RBD, p99 |', '|---|---:|---:|---:|---:|---:|');
  for (const { phase, c } of rows(r)) {
    const got = servers.map((s) => byCase(r, phase, c.id, s));
    const cell = (x: CephCase | undefined): string => (x?.fio ? `${latText(x.fio.meanLatNs)} / ${latText(x.fio.p99LatNs)}` : x?.error ? 'error' : '');
    L.push(`| ${rowLabel(phase, c.label)} | ${got.map(cell).join(' | ')} | ${ratio(got[1]?.fio?.meanLatNs, got[0]?.fio?.meanLatNs)} | ${ratio(got[1]?.fio?.p99LatNs, got[0]?.fio?.p99LatNs)} |`);
  }
  L.push('', 'Below 1 is better for pcache.', '');

  L.push('### The fill before the cache-full cases', '');
  for (const f of r.fills) {
    const label = SERVERS.find((s) => s.id === f.server)!.label;
    if (!f.fio) {
      L.push(`- ${label}: error ${f.error ?? ''}`);
      continue;
    }
    const p = f.pcacheAfter;
    L.push(
      `- ${label}: ${fmt((f.fio.ios * 4 * KiB) / MiB, 0)} MiB in ${fmt(f.fio.seconds, 1)} s (${fmt(f.fio.iops)} IOPS)` +
        (p ? `; then ${p.segsUsed} of ${p.segNum} segments in use (${fmt((p.segsUsed / p.segNum) * 100, 0)}%), ${fmt(p.dirtyBytes / MiB, 0)} MiB dirty` : ''),
    );
  }
  for (const c of r.cases.filter((x) => x.phase === 'full' && x.pcacheAtStart)) {
    const p = c.pcacheAtStart!;
    L.push(`- pcache at the start of "${c.label}, cache full": ${p.segsUsed} of ${p.segNum} segments in use, ${fmt(p.dirtyBytes / MiB, 0)} MiB dirty`);
  }
  L.push('');

  const d = r.drain;
  L.push('### Write-back drain', '');
  if (!d) L.push('Not run.');
  else if (d.error || d.keysPerSecond === null) L.push(`Failed: ${d.error ?? 'no figures'}`);
  else {
    const ref = byCase(r, 'empty', 'randwrite-4k-qd32-j1', 'rbd')?.fio?.iops;
    L.push(
      `A fresh pcache took ${d.burstBytes / MiB} MiB of 4 KiB random writes (qd32, every block once, ${fmt(d.burstMiBps ?? 0, 1)} MiB/s, ending with a flush); ` +
        `then \`pcache flush\` (the control request, timed in the benchmark process) wrote back the ${fmt((d.dirtyAtFlush ?? 0) / MiB, 1)} MiB still dirty: ` +
        `${fmt((d.flushedBytes ?? 0) / MiB, 1)} MiB in ${fmt(d.flushSeconds ?? 0, 1)} s, **${fmt(d.keysPerSecond)} keys/s** (4 KiB keys)` +
        (ref ? `, ${ratio(d.keysPerSecond, ref)} of RBD's own 4 KiB random-write rate at qd32 in this run (${fmt(ref)} IOPS).` : '.') +
        ' (Write-back also runs during the burst, so less than the burst was dirty at the flush.)',
    );
  }
  L.push(
    '',
    'Reading the cache-full rows: once every segment holds dirty 4 KiB keys, a new write waits until write-back has copied a kset to RBD ' +
      'and GC has freed a segment, so writes through a full pcache run at about the rate write-back drains (in bytes per second, whatever their size), while RBD alone ' +
      'and librbd\'s small cache keep RBD\'s own rate. A cache full of dirty 4 KiB random keys is the worst case for large writes: each 1 MiB ' +
      'written waits for 256 small keys to be written back. With an empty (or clean) cache, writes are acknowledged at cache speed and reads of written data hit the cache.',
    '',
  );
  L.push('### Commands', '', '`$DIR` is the temporary directory; `OUT.json` fio\'s output.', '', '```sh');
  // The temporary directory as $DIR, and paths in the repository relative to its root (where npm runs).
  const tidy = (s: string): string => s.split(r.dirPrefix).join('$DIR').split(REPO).join('');
  for (const s of r.servers) for (const cmd of s.commands) L.push(tidy(cmd));
  const seen = new Set<string>();
  for (const c of [...r.cases.map((x) => x.command), ...r.fills.map((f) => f.command), ...(r.drain?.commands ?? [])]) {
    const line = tidy(c).replace(/--output=\S+/, '--output=OUT.json').replace(/"?--uri=[^\s"]+"?/, '--uri="$URI"');
    if (line && !seen.has(line)) {
      seen.add(line);
      L.push(line);
    }
  }
  L.push('```', '');
  return L.join('\n');
}

/** Replace the Ceph RBD section of BENCHMARKS.md (or append it), leaving every other section as it is. */
function writeSection(mdPath: string, section: string): void {
  const old = existsSync(mdPath) ? readFileSync(mdPath, 'utf8') : '# pcache benchmarks\n';
  const start = old.indexOf(`\n${SECTION}\n`);
  let text: string;
  if (start < 0) text = old.trimEnd() + '\n\n' + section;
  else {
    const next = old.indexOf('\n## ', start + 1 + SECTION.length);
    text = old.slice(0, start + 1) + section + (next >= 0 ? '\n' + old.slice(next + 1) : '');
  }
  mkdirSync(dirname(mdPath), { recursive: true });
  writeFileSync(mdPath, text.trimEnd() + '\n');
}

// ---- start and end ----

let tempDir: string | null = null;
let cluster: CephCluster | null = null;

async function endEverything(): Promise<void> {
  await cluster?.stop().catch(() => undefined);
  for (const c of children) c.kill('SIGTERM');
  const deadline = Date.now() + 10_000;
  while (children.size > 0 && Date.now() < deadline) await sleep(50);
  for (const c of children) c.kill('SIGKILL');
  if (tempDir) rmSync(tempDir, { recursive: true, force: true });
  tempDir = null;
}

async function preflight(): Promise<void> {
  const missing = cephMissing();
  const lacks: string[] = missing ? [missing] : [];
  for (const [cmd, pkg] of [
    ['fio', 'fio'],
    ['nbdinfo', 'libnbd-bin'],
  ] as const) {
    const r = await run(cmd, ['--version']).catch(() => null);
    if (!r || r.code !== 0) lacks.push(`${cmd} is missing (apt-get install -y ${pkg})`);
  }
  if (lacks.length) throw new Error(lacks.join('\n'));
}

async function toolVersion(cmd: string): Promise<string> {
  const r = await run(cmd, ['--version']).catch(() => null);
  return r?.stdout.split('\n')[0]!.trim() ?? cmd;
}

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  if (!opts) return 0;
  if (opts.render) {
    writeSection(opts.md, renderSection(JSON.parse(readFileSync(opts.render, 'utf8')) as CephResults));
    log(`wrote the "${SECTION.slice(3)}" section of ${relative(process.cwd(), opts.md) || opts.md} from ${opts.render}`);
    return 0;
  }
  await preflight();
  let stopping = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (stopping) process.exit(130);
    stopping = true;
    log(`${sig}: ending the servers and the cluster, removing the temporary directory`);
    void endEverything().then(() => process.exit(130));
  };
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, onSignal);
  process.on('exit', () => {
    for (const c of children) c.kill('SIGKILL');
    if (tempDir) rmSync(tempDir, { recursive: true, force: true });
  });

  mkdirSync(opts.dir, { recursive: true });
  const tmp = mkdtempSync(join(opts.dir, 'pcache-ceph-bench-'));
  tempDir = tmp;
  const runDir = join(tmp, 'run');
  mkdirSync(runDir);
  process.env.PCACHE_RUN_DIR = runDir;
  const results: CephResults = {
    startedAt: new Date().toISOString(),
    finishedAt: '',
    machine: await machineInfo(tmp, REPO),
    ceph: (await toolVersion('ceph')).replace(/ \([0-9a-f]{40}\)/, ''),
    qemuNbd: await toolVersion('qemu-nbd'),
    argv: process.argv.slice(2),
    runtime: opts.runtime,
    cacheSize: opts.cacheSize,
    imageSize: IMAGE_SIZE,
    fillSeconds: opts.fillSeconds,
    bootstrapSeconds: 0,
    dirPrefix: tmp,
    servers: [],
    cases: [],
    fills: [],
    drain: null,
  };
  log(`pcache on Ceph RBD: files in ${tmp}`);
  const t0 = performance.now();
  cluster = await startCluster({ dir: join(tmp, 'ceph'), imageSize: IMAGE_SIZE, log });
  results.bootstrapSeconds = (performance.now() - t0) / 1000;
  const ctx: Ctx = { opts, tmp, runDir, cluster, results };
  try {
    for (const s of SERVERS) if (!stopping) await runServer(ctx, s.id);
    if (!stopping) results.drain = await runDrain(ctx);
  } finally {
    await cluster.stop();
    cluster = null;
  }
  if (stopping) return 130;
  results.finishedAt = new Date().toISOString();
  results.machine.loadAtEnd = loadAverage();
  writeSection(opts.md, renderSection(results));
  mkdirSync(dirname(opts.json), { recursive: true });
  writeFileSync(opts.json, JSON.stringify(results, null, 2) + '\n');
  log(`wrote the "${SECTION.slice(3)}" section of ${relative(process.cwd(), opts.md) || opts.md} and ${relative(process.cwd(), opts.json) || opts.json}`);
  return 0;
}

main().then(
  async (code) => {
    await endEverything();
    process.exitCode = code;
  },
  async (err: unknown) => {
    log(`bench:ceph: ${errText(err)}`);
    await endEverything();
    process.exitCode = 1;
  },
);
