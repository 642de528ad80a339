/**
 * Named benchmark cases, each a ratio from one run, each runnable on its own
 * (`npm run bench -- --case NAME[,NAME]`, or `--case all`): sustained writes and write-back drains
 * over a slow backing, uncached reads, and durable writes where both sides do the same flushes.
 */
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fioCommand, runFio, type FioJob } from './fio.js';
import { commandLine, pcacheFlush, pcacheStats, startNbdkit, startPcache, type Server } from './servers.js';
import { dropFileCache, fillFile, GiB, KiB, MiB, run, sparseFile, syncFile } from './sys.js';

export const SCENARIOS = ['sustained-randwrite', 'drain-4k-slow', 'drain-1m-slow', 'drain-fast', 'uncached-read', 'durable-write'] as const;
export type ScenarioName = (typeof SCENARIOS)[number];

export interface ScenarioRow {
  scenario: ScenarioName;
  label: string;
  unit: string;
  pcache: number | null;
  reference: number | null;
  referenceLabel: string;
  target: string;
  /** The cache device's state when the measured part began. */
  cacheState: string;
  note: string;
  error: string | null;
  /** Which run measured it: start time (UTC), commit, load average then. */
  run?: string;
}

export interface ScenarioResults {
  startedAt: string;
  finishedAt: string;
  loadAtStart: string;
  loadAtEnd: string;
  rows: ScenarioRow[];
  /** Every command the run used, per scenario ($DIR is the temporary directory). */
  commands: Partial<Record<ScenarioName, string[]>>;
}

export interface ScenarioEnv {
  repo: string;
  tmp: string;
  runDir: string;
  cacheSize: number;
  /** Seconds of the sustained-write runs (90 by default; the last third is the steady state). */
  sustainSeconds: number;
  /** Seconds of the other timed runs. */
  runtime: number;
  log(text: string): void;
}

const SLOW = ['delay-write=2ms', 'delay-read=2ms'];
/** The scenarios' own backing file, 8 GiB: regions below. */
const BACKING_SIZE = 8 * GiB;
const SUSTAIN_REGION = { offset: 0, size: 4 * GiB };
const DRAIN_REGION = { offset: 4 * GiB, size: 512 * MiB };
const UNCACHED_REGION = (k: number): { offset: number; size: number } => ({ offset: 5 * GiB + k * GiB, size: GiB });
const DURABLE_REGION = { offset: 0, size: GiB };

class Run {
  readonly backing: string;
  readonly rows: ScenarioRow[] = [];
  readonly commands: Partial<Record<ScenarioName, string[]>> = {};
  private filled = new Set<number>();
  private seq = 0;

  constructor(readonly env: ScenarioEnv) {
    this.backing = join(env.tmp, 'scenario-backing.img');
  }

  /** Record a command as a reader would type it: the temporary directory as $DIR, paths from the repository. */
  note(s: ScenarioName, command: string): void {
    const cmd = command.split(this.env.tmp).join('$DIR').split(this.env.repo).join('');
    const list = (this.commands[s] ??= []);
    if (!list.includes(cmd)) list.push(cmd);
  }

  async prepare(): Promise<void> {
    await sparseFile(this.backing, BACKING_SIZE);
  }

  /** Put data in an uncached-read region once (so that reads there read the disk, not holes). */
  async fillRegion(k: number): Promise<void> {
    if (this.filled.has(k)) return;
    const r = UNCACHED_REGION(k);
    this.env.log(`   writing data into the backing file at ${r.offset / GiB} GiB (${r.size / GiB} GiB)`);
    await fillFile(this.backing, r.offset, r.size);
    this.filled.add(k);
  }

  async nbdkit(s: ScenarioName, id: string, label: string, args: string[]): Promise<Server> {
    const srv = await startNbdkit({ id, label, socket: join(this.env.tmp, `${id}-${++this.seq}.sock`), args, files: [this.backing], tmpdir: this.env.tmp, log: join(this.env.tmp, `${id}.log`) });
    for (const c of srv.commands) this.note(s, c);
    return srv;
  }

  file(s: ScenarioName): Promise<Server> {
    return this.nbdkit(s, 'file', 'nbdkit file', ['file', this.backing]);
  }

  slow(s: ScenarioName, id = 'slow'): Promise<Server> {
    return this.nbdkit(s, id, 'nbdkit delay 2 ms', ['--filter=delay', 'file', this.backing, ...SLOW]);
  }

  /** A fresh (empty) pcache over the local backing file, or over the 2 ms delay export. */
  async pcache(s: ScenarioName, over: 'file' | 'slow'): Promise<Server> {
    const cacheDev = join(this.env.tmp, `scenario-cache-${++this.seq}.img`);
    await sparseFile(cacheDev, this.env.cacheSize);
    const below = over === 'slow' ? await this.slow(s, 'pcache-below') : undefined;
    const srv = await startPcache({
      id: 'pcache',
      label: over === 'slow' ? 'pcache -> nbdkit delay' : 'pcache',
      repo: this.env.repo,
      socket: join(this.env.tmp, `pcache-${this.seq}.sock`),
      cacheDev,
      backingDev: below ? below.uri : this.backing,
      backingFiles: [this.backing],
      below,
      runDir: this.env.runDir,
      log: join(this.env.tmp, `pcache-${this.seq}.log`),
    });
    this.note(s, srv.commands[srv.commands.length - 1]!);
    return srv;
  }

  async fio(s: ScenarioName, job: FioJob, srv: Server): Promise<{ fio: Awaited<ReturnType<typeof runFio>>; wall: number }> {
    const out = join(this.env.tmp, `fio-${job.name}-${srv.id}-${++this.seq}.json`);
    this.note(s, fioCommand(job, 'SERVER_URI', 'OUT.json').replace('SERVER_URI', '"$URI"'));
    const t0 = performance.now();
    const fio = await runFio(job, srv.uri, out);
    return { fio, wall: (performance.now() - t0) / 1000 };
  }

  async stop(srv: Server | undefined): Promise<void> {
    await srv?.stop().catch((err) => this.env.log(`   stopping ${srv.id}: ${err instanceof Error ? err.message : String(err)}`));
  }

  row(r: Omit<ScenarioRow, 'error'> & { error?: string | null }): void {
    const full = { error: null, ...r };
    this.rows.push(full);
    const ratio = full.pcache !== null && full.reference ? ` = ${(full.pcache / full.reference).toFixed(2)}x` : '';
    this.env.log(`   ${full.label}: pcache ${fmt(full.pcache)} vs ${full.referenceLabel} ${fmt(full.reference)} ${full.unit}${ratio}${full.error ? ` (${full.error})` : ''}`);
  }
}

function fmt(n: number | null): string {
  return n === null ? '–' : n.toLocaleString('en-US', { maximumFractionDigits: n >= 100 ? 0 : 1 });
}

function message(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).split('\n')[0]!;
}

/** The mean of fio's per-second IOPS log over its last `seconds`. */
async function steadyIops(logFile: string, totalSeconds: number, seconds: number): Promise<number> {
  const text = await fsp.readFile(logFile, 'utf8');
  const from = (totalSeconds - seconds) * 1000;
  const values = text
    .split('\n')
    .map((l) => l.split(',').map((x) => Number(x.trim())))
    .filter((f) => f.length >= 2 && Number.isFinite(f[0]) && f[0]! > from && f[0]! <= totalSeconds * 1000)
    .map((f) => f[1]!);
  if (values.length === 0) throw new Error(`no IOPS samples after ${from / 1000} s in ${logFile}`);
  return values.reduce((a, b) => a + b, 0) / values.length;
}

async function sustained(r: Run): Promise<void> {
  const s = 'sustained-randwrite';
  const secs = r.env.sustainSeconds;
  const steady = Math.max(1, Math.round(secs / 3));
  const job = (name: string): FioJob => ({
    name,
    rw: 'randwrite',
    bs: 4 * KiB,
    iodepth: 32,
    numjobs: 1,
    ...SUSTAIN_REGION,
    runtime: secs,
    endFsync: true,
    extra: [`--write_iops_log=${join(r.env.tmp, name)}`, '--log_avg_msec=1000'],
  });
  const measure = async (srv: Server, name: string): Promise<number> => {
    await r.fio(s, job(name), srv);
    return steadyIops(join(r.env.tmp, `${name}_iops.1.log`), secs, steady);
  };
  let direct: number | null = null;
  let pcache: number | null = null;
  let error: string | null = null;
  try {
    const slow = await r.slow(s);
    try {
      direct = await measure(slow, 'sustained-direct');
    } finally {
      await r.stop(slow);
    }
    const pc = await r.pcache(s, 'slow');
    try {
      pcache = await measure(pc, 'sustained-pcache');
    } finally {
      await r.stop(pc);
    }
  } catch (err) {
    error = message(err);
  }
  r.row({
    scenario: s,
    label: `4K random write qd32, ${secs} s over the 2 ms backing, working set ${SUSTAIN_REGION.size / GiB} GiB, mean IOPS of the last ${steady} s`,
    unit: 'IOPS',
    pcache,
    reference: direct,
    referenceLabel: 'direct to the 2 ms backing',
    target: '≥ 1.0x',
    cacheState: `starts empty (${r.env.cacheSize / GiB} GiB); full in the steady state`,
    note: 'both runs end with a FLUSH (--end_fsync=1)',
    error,
  });
}

/**
 * Write-back drain: a burst of random writes into a fresh pcache, then `pcache flush` timed; the
 * rate is the bytes written back during the flush over its time.
 */
async function drainRate(r: Run, s: ScenarioName, over: 'file' | 'slow', bs: number, bytes: number): Promise<{ mibps: number; dirtyAtFlush: number }> {
  const pc = await r.pcache(s, over);
  try {
    await r.fio(s, { name: `${s}-burst`, rw: 'randwrite', bs, iodepth: 32, numjobs: 1, offset: DRAIN_REGION.offset, size: bytes, runtime: null }, pc);
    const s0 = await pcacheStats(pc.cacheDev!);
    const t0 = performance.now();
    await pcacheFlush(pc.cacheDev!);
    const secs = (performance.now() - t0) / 1000;
    const s1 = await pcacheStats(pc.cacheDev!);
    r.note(s, 'pcache flush $DIR/cache.img (the control request, timed in the benchmark process)');
    r.env.log(`   ${bs / KiB} KiB keys: ${fmt(s0.dirtyBytes / MiB)} MiB dirty at the flush, written back in ${secs.toFixed(2)} s`);
    return { mibps: (s1.writtenBackBytes - s0.writtenBackBytes) / MiB / secs, dirtyAtFlush: s0.dirtyBytes };
  } finally {
    await r.stop(pc);
  }
}

async function drainSlow(r: Run, s: 'drain-4k-slow' | 'drain-1m-slow', bs: number, bytes: number, refDepths: number[]): Promise<void> {
  let pcache: { mibps: number; dirtyAtFlush: number } | null = null;
  let error: string | null = null;
  const refs = new Map<number, number>();
  try {
    pcache = await drainRate(r, s, 'slow', bs, bytes);
    const slow = await r.slow(s);
    try {
      for (const qd of refDepths) {
        const job: FioJob = { name: `${s}-direct-qd${qd}`, rw: 'randwrite', bs, iodepth: qd, numjobs: 1, offset: DRAIN_REGION.offset, size: DRAIN_REGION.size, runtime: r.env.runtime, endFsync: true };
        refs.set(qd, (await r.fio(s, job, slow)).fio.mibps);
      }
    } finally {
      await r.stop(slow);
    }
  } catch (err) {
    error = message(err);
  }
  for (const qd of refDepths.length ? refDepths : [32]) {
    r.row({
      scenario: s,
      label: `drain of random ${bs >= MiB ? `${bs / MiB} MiB` : `${bs / KiB} KiB`} keys over the 2 ms backing (${bytes / MiB} MiB burst, then pcache flush), MiB/s`,
      unit: 'MiB/s',
      pcache: pcache?.mibps ?? null,
      reference: refs.get(qd) ?? null,
      referenceLabel: `fio ${bs >= MiB ? `${bs / MiB}M` : `${bs / KiB}K`} random writes qd${qd} direct (ends with a FLUSH)`,
      target: '≥ 0.8x',
      cacheState: pcache ? `${fmt(pcache.dirtyAtFlush / MiB)} MiB dirty at the flush` : 'fresh',
      note: 'the rest of the burst was written back while it ran',
      error,
    });
  }
}

async function drainFast(r: Run): Promise<void> {
  const s = 'drain-fast';
  const bytes = 512 * MiB;
  let pcache: { mibps: number; dirtyAtFlush: number } | null = null;
  let nbdcopy: number | null = null;
  let error: string | null = null;
  try {
    pcache = await drainRate(r, s, 'file', 64 * KiB, bytes);
    await syncFile(r.backing);
    const source = join(r.env.tmp, 'drain-source.img');
    await sparseFile(source, bytes);
    await fillFile(source, 0, bytes);
    const target = await r.file(s);
    try {
      const args = ['--flush', source, target.uri];
      r.note(s, commandLine('nbdcopy', ['--flush', source, 'SERVER_URI']).replace('SERVER_URI', '"$URI"'));
      const t0 = performance.now();
      const res = await run('nbdcopy', args);
      if (res.code !== 0) throw new Error(`nbdcopy exited ${res.code}: ${res.stderr.trim()}`);
      nbdcopy = bytes / MiB / ((performance.now() - t0) / 1000);
    } finally {
      await r.stop(target);
      await fsp.rm(source, { force: true });
    }
  } catch (err) {
    error = message(err);
  }
  r.row({
    scenario: s,
    label: `drain of random 64 KiB keys over nbdkit file (${bytes / MiB} MiB burst, then pcache flush), MiB/s`,
    unit: 'MiB/s',
    pcache: pcache?.mibps ?? null,
    reference: nbdcopy,
    referenceLabel: `nbdcopy --flush of ${bytes / MiB} MiB to nbdkit file`,
    target: '≥ 0.8x',
    cacheState: pcache ? `${fmt(pcache.dirtyAtFlush / MiB)} MiB dirty at the flush` : 'fresh',
    note: 'pcache over an nbdkit file export of the backing file',
    error,
  });
}

async function uncachedRead(r: Run): Promise<void> {
  const s = 'uncached-read';
  const shapes = [
    { bs: 4 * KiB, qd: 1 },
    { bs: 4 * KiB, qd: 32 },
    { bs: MiB, qd: 4 },
  ];
  for (const [k, shape] of shapes.entries()) {
    await r.fillRegion(k);
    for (const over of ['file', 'slow'] as const) {
      const name = `uncached-${shape.bs / KiB}k-qd${shape.qd}`;
      const job: FioJob = { name, rw: 'randread', bs: shape.bs, iodepth: shape.qd, numjobs: 1, ...UNCACHED_REGION(k), runtime: r.env.runtime };
      const once = async (start: () => Promise<Server>): Promise<number> => {
        const srv = await start();
        try {
          // The backing file leaves the page cache before each run: every run reads the disk first.
          await dropFileCache(r.backing);
          return (await r.fio(s, job, srv)).fio.mibps;
        } finally {
          await r.stop(srv);
        }
      };
      let ref: number | null = null;
      let pc: number | null = null;
      let error: string | null = null;
      try {
        ref = await once(() => (over === 'file' ? r.file(s) : r.slow(s)));
        pc = await once(() => r.pcache(s, over));
      } catch (err) {
        error = message(err);
      }
      const size = shape.bs >= MiB ? `${shape.bs / MiB}M` : `${shape.bs / KiB}K`;
      r.row({
        scenario: s,
        label: `uncached ${size} random read qd${shape.qd}, ${over === 'file' ? 'backing: local file' : 'backing: 2 ms delay'}, MiB/s`,
        unit: 'MiB/s',
        pcache: pc,
        reference: ref,
        referenceLabel: over === 'file' ? 'nbdkit file' : 'nbdkit delay 2 ms direct',
        target: '≥ 0.8x',
        cacheState: 'empty; the region never read before; backing file dropped from the page cache',
        note: '',
        error,
      });
    }
  }
}

async function durableWrite(r: Run): Promise<void> {
  const s = 'durable-write';
  const shapes: Array<{ label: string; job: FioJob }> = [
    {
      label: '1M sequential write qd32, 1 GiB, ends with a FLUSH',
      job: { name: 'durable-seq-1m', rw: 'write', bs: MiB, iodepth: 32, numjobs: 1, ...DURABLE_REGION, runtime: null, endFsync: true },
    },
    {
      label: '64K random write qd32, 1 GiB (each block once), a FLUSH every 256 writes',
      job: { name: 'durable-rand-64k', rw: 'randwrite', bs: 64 * KiB, iodepth: 32, numjobs: 1, ...DURABLE_REGION, runtime: null, fsyncEvery: 256, endFsync: true },
    },
  ];
  for (const { label, job } of shapes) {
    let ref: number | null = null;
    let pc: number | null = null;
    let disk: number | null = null;
    let error: string | null = null;
    // Throughput over the wall time of the whole fio run, its flushes included, the same for both.
    const rate = async (srv: Server): Promise<number> => DURABLE_REGION.size / MiB / (await r.fio(s, job, srv)).wall;
    try {
      const file = await r.file(s);
      try {
        ref = await rate(file);
      } finally {
        await r.stop(file);
      }
      await syncFile(r.backing);
      const pcache = await r.pcache(s, 'file');
      try {
        pc = await rate(pcache);
      } finally {
        await r.stop(pcache);
      }
      disk = await diskDurable(r, job);
    } catch (err) {
      error = message(err);
    }
    r.row({
      scenario: s,
      label: `durable ${label}, MiB/s (over fio's wall time)`,
      unit: 'MiB/s',
      pcache: pc,
      reference: ref,
      referenceLabel: 'nbdkit file, same flushes',
      target: '≥ 0.8x',
      cacheState: `starts empty (${r.env.cacheSize / GiB} GiB)`,
      note: disk !== null ? `the cache file's filesystem itself, same job with fio on a file: ${fmt(disk)} MiB/s (the physical limit of durable writes)` : '',
      error,
    });
  }
}

/** The same durable job written by fio straight into a file beside the cache device: what the disk can do. */
async function diskDurable(r: Run, job: FioJob): Promise<number> {
  const path = join(r.env.tmp, 'disk-probe.img');
  await sparseFile(path, job.offset + job.size);
  const out = join(r.env.tmp, `fio-disk-${job.name}.json`);
  const args = [
    `--name=${job.name}-disk`,
    `--filename=${path}`,
    '--ioengine=libaio',
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    `--offset=${job.offset}`,
    `--size=${job.size}`,
    ...(job.endFsync ? ['--end_fsync=1'] : []),
    ...(job.fsyncEvery ? [`--fsync=${job.fsyncEvery}`] : []),
    '--output-format=json',
    `--output=${out}`,
  ];
  r.note('durable-write', commandLine('fio', args));
  const t0 = performance.now();
  const res = await run('fio', args);
  const wall = (performance.now() - t0) / 1000;
  await fsp.rm(path, { force: true });
  if (res.code !== 0) throw new Error(`fio on the disk probe exited ${res.code}: ${res.stderr.trim()}`);
  return job.size / MiB / wall;
}

export async function runScenarios(env: ScenarioEnv, names: readonly ScenarioName[], loadAverage: () => string): Promise<ScenarioResults> {
  const r = new Run(env);
  const startedAt = new Date().toISOString();
  const loadAtStart = loadAverage();
  await r.prepare();
  for (const name of names) {
    env.log(`-- case ${name}`);
    if (name === 'sustained-randwrite') await sustained(r);
    else if (name === 'drain-4k-slow') await drainSlow(r, name, 4 * KiB, 64 * MiB, [32]);
    else if (name === 'drain-1m-slow') await drainSlow(r, name, MiB, 512 * MiB, [32, 4]);
    else if (name === 'drain-fast') await drainFast(r);
    else if (name === 'uncached-read') await uncachedRead(r);
    else await durableWrite(r);
  }
  return { startedAt, finishedAt: new Date().toISOString(), loadAtStart, loadAtEnd: loadAverage(), rows: r.rows, commands: r.commands };
}

export function parseScenarioList(text: string): ScenarioName[] {
  if (text === 'all') return [...SCENARIOS];
  const names = text.split(',').map((t) => t.trim()).filter(Boolean);
  for (const n of names) if (!(SCENARIOS as readonly string[]).includes(n)) throw new Error(`--case: unknown case '${n}' (known: ${SCENARIOS.join(', ')}, or all)`);
  return names as ScenarioName[];
}

export const SCENARIO_START = '<!-- bench cases: start -->';
export const SCENARIO_END = '<!-- bench cases: end -->';

/** The markdown block for BENCHMARKS.md, between the markers a full run keeps. */
export function renderScenarios(res: ScenarioResults, argv: string[], commit: string): string {
  const out: string[] = [SCENARIO_START, '## Sustained writes, drains, uncached reads and durable writes (`--case`)', ''];
  out.push(
    `Last written by \`npm run bench -- ${argv.join(' ')}\` from ${res.startedAt.slice(0, 16).replace('T', ' ')} to ${res.finishedAt.slice(11, 16)} UTC, pcache at commit ${commit}; rows of other cases are kept from their own runs (last column). ` +
      'Each case reruns on its own with `npm run bench -- --case NAME` (names below; a comma-separated list, or `all`). ' +
      'Ratios are pcache ÷ reference from the same run; above 1 is better.',
    '',
    `**The machine is shared**: 2 cores, used by other engineers' builds and tests during this run (load average ${res.loadAtStart} at the start, ${res.loadAtEnd} at the end). ` +
      'Absolute numbers are noisy; the ratios, measured side by side, are what count, and even they move by tens of percent between runs.',
    '',
    '| case | what | pcache | reference | ratio | target | cache state | notes | run (UTC, commit, 1-min load) |',
    '|---|---|---:|---|---:|---|---|---|---|',
  );
  for (const row of res.rows) {
    const ratio = row.pcache !== null && row.reference ? `${(row.pcache / row.reference).toFixed(2)}x` : '–';
    const ref = `${fmt(row.reference)} (${row.referenceLabel})`;
    const notes = [row.note, row.error ? `error: ${row.error}` : ''].filter(Boolean).join('; ');
    out.push(`| \`${row.scenario}\` | ${row.label} | ${fmt(row.pcache)} | ${ref} | ${ratio} | ${row.target} | ${row.cacheState} | ${notes} | ${row.run ?? ''} |`);
  }
  out.push('', 'Commands (`$DIR` is the temporary directory, `$URI` the server under test):', '');
  for (const [name, cmds] of Object.entries(res.commands)) {
    out.push(`\`${name}\`:`, '', '```sh', ...cmds!, '```', '');
  }
  out.push(SCENARIO_END);
  return out.join('\n') + '\n';
}

/** Put the block into a BENCHMARKS.md text: in place of the old one, or before the in-process engine section. */
export function spliceScenarios(md: string, block: string, before: string): string {
  const a = md.indexOf(SCENARIO_START);
  const b = md.indexOf(SCENARIO_END);
  if (a >= 0 && b > a) return md.slice(0, a) + block.trimEnd() + md.slice(b + SCENARIO_END.length);
  const at = md.indexOf(before);
  return at >= 0 ? md.slice(0, at) + '\n' + block + md.slice(at) : md.trimEnd() + '\n\n' + block;
}
