/**
 * Where pcache serve spends CPU on one hot path: serve a fresh cache under node --cpu-prof, drive it
 * with one fio job (4 KiB random writes or cached random reads, qd32), stop it cleanly so the profile
 * is written, and summarize the profile over the fio run only. nbdkit memory runs the same job after,
 * for its IOPS.
 *
 *   node --import tsx bench/nbd/profile.ts [--case randwrite|randread] [--runtime S] [--out DIR]
 *                                          [--interval US] [--no-nbdkit] [--dir DIR] [--cache-gib N]
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { findSourceMap } from 'node:module';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { controlRequest } from '../../src/cli/control.js';
import { jobFor, makeCase, primeJob, primeWritesJob, warmJob } from './cases.js';
import { fioCommand, runFio, type FioFigures, type FioJob } from './fio.js';
import { startNbdkit, startPcache, type Server } from './servers.js';
import { children, cpuSeconds, GiB, initClockTicks, KiB, loadAverage, ownCpuSeconds, sleep, sparseFile, systemBusySeconds, threadCpuSeconds } from './sys.js';

const REPO = fileURLToPath(new URL('../../', import.meta.url));
const CASES = { randwrite: 'randwrite', randread: 'cachedread' } as const;
type CaseName = keyof typeof CASES;

interface Options {
  case: CaseName;
  runtime: number;
  out: string;
  intervalUs: number;
  nbdkit: boolean;
  dir: string;
  cacheGiB: number;
}

function parseOptions(): Options {
  const { values } = parseArgs({
    options: {
      case: { type: 'string', default: 'randwrite' },
      runtime: { type: 'string', default: '20' },
      out: { type: 'string' },
      interval: { type: 'string', default: '1000' },
      'no-nbdkit': { type: 'boolean', default: false },
      dir: { type: 'string', default: tmpdir() },
      'cache-gib': { type: 'string', default: '1' },
    },
    strict: true,
  });
  const name = values.case as string;
  if (!(name in CASES)) throw new Error(`--case is randwrite or randread, not '${name}'`);
  const runtime = Number(values.runtime);
  const intervalUs = Number(values.interval);
  if (!Number.isInteger(runtime) || runtime < 1) throw new Error(`--runtime takes whole seconds, not '${values.runtime}'`);
  const cacheGiB = Number(values['cache-gib']);
  if (!Number.isInteger(cacheGiB) || cacheGiB < 1) throw new Error(`--cache-gib takes whole GiB, not '${values['cache-gib']}'`);
  if (!Number.isInteger(intervalUs) || intervalUs < 50) throw new Error(`--interval takes microseconds (>= 50), not '${values.interval}'`);
  return {
    case: name as CaseName,
    runtime,
    out: resolve(values.out ?? join(REPO, 'bench/nbd/out', `profile-${name}`)),
    intervalUs,
    nbdkit: !values['no-nbdkit'],
    dir: resolve(values.dir),
    cacheGiB,
  };
}

// ---- running the job ----

interface Measured {
  fio: FioFigures;
  /** The fio run on the monotonic clock, microseconds (the clock .cpuprofile timestamps use). */
  fromUs: number;
  toUs: number;
  /** Wall seconds over which the CPU figures below were taken (fio's whole life). */
  wall: number;
  /** Server CPU seconds over the run: in all, and by thread name (threads that ended are missing). */
  cpu: number;
  threads: Map<string, number>;
  fioCpu: number;
  /** CPU seconds used by everything else on the machine meanwhile (a noisy neighbour). */
  othersCpu: number;
  /** The main thread's context switches over the run: waits (voluntary) and preemptions. */
  switches: { voluntary: number; involuntary: number };
  /** pcache's counters that moved over the run, and its state at the end (pcache only). */
  counters: string | null;
}

interface PcacheState {
  counters: Record<string, number>;
  segsUsed: number;
  nSegs: number;
}

async function pcacheState(cacheDev: string): Promise<PcacheState> {
  const res = await controlRequest(cacheDev, { cmd: 'stats', args: [] });
  if (!res.ok) throw new Error(`pcache stats: ${res.error ?? 'refused'}`);
  return res.data as PcacheState;
}

function counterLine(a: PcacheState, b: PcacheState): string {
  const moved = Object.keys(b.counters)
    .filter((k) => b.counters[k] !== a.counters[k] && k !== 'dirtyBytes' && k !== 'writesWaiting')
    .map((k) => `${k} ${num(b.counters[k]! - (a.counters[k] ?? 0))}`);
  return `${moved.join(', ')}; at the end: dirty ${num(b.counters.dirtyBytes! / 2 ** 20)} MiB, ${b.segsUsed}/${b.nSegs} segments used`;
}

const monoUs = (): number => Number(process.hrtime.bigint() / 1000n);

function mainThreadSwitches(pid: number): { voluntary: number; involuntary: number } {
  const text = readFileSync(`/proc/${pid}/task/${pid}/status`, 'utf8');
  const field = (name: string): number => Number(new RegExp(`^${name}:\\s*(\\d+)`, 'm').exec(text)?.[1] ?? 0);
  return { voluntary: field('voluntary_ctxt_switches'), involuntary: field('nonvoluntary_ctxt_switches') };
}

/** Prepare the region (reads only: write it, flush, read it once), then run the timed job. */
async function measure(server: Server, name: CaseName, job: FioJob, tmp: string): Promise<Measured> {
  const fio = (j: FioJob): Promise<FioFigures> => runFio(j, server.uri, join(tmp, `fio-${server.id}-${j.name}.json`));
  if (name === 'randread') {
    await fio(primeJob());
    await server.settle();
    await fio(warmJob());
  } else if (!server.cacheDev) {
    await fio(primeWritesJob()); // nbdkit memory allocates on first write, as in run.ts
  }
  const pid = server.pids()[0]!;
  const state0 = server.cacheDev ? await pcacheState(server.cacheDev) : null;
  const cpu0 = threadCpuSeconds(pid);
  const total0 = cpuSeconds([pid]);
  const sw0 = mainThreadSwitches(pid);
  const own0 = ownCpuSeconds();
  const busy0 = systemBusySeconds();
  const startUs = monoUs();
  const figures = await fio(job);
  const toUs = monoUs();
  // fio's own run time, ending as it exits: leaves out its start-up (connecting, laying out the job).
  const fromUs = Math.max(startUs, toUs - figures.seconds * 1e6);
  const busy = systemBusySeconds() - busy0;
  const sw1 = mainThreadSwitches(pid);
  const own1 = ownCpuSeconds();
  const threads = new Map<string, number>();
  for (const [k, v] of threadCpuSeconds(pid)) threads.set(k, v - (cpu0.get(k) ?? 0));
  const serverCpu = cpuSeconds([pid]) - total0;
  const fioCpu = own1.children - own0.children;
  const counters = state0 && server.cacheDev ? counterLine(state0, await pcacheState(server.cacheDev)) : null;
  return {
    fio: figures,
    fromUs,
    toUs,
    wall: (toUs - startUs) / 1e6,
    cpu: serverCpu,
    threads,
    fioCpu,
    othersCpu: Math.max(0, busy - serverCpu - fioCpu - (own1.self - own0.self)),
    switches: { voluntary: sw1.voluntary - sw0.voluntary, involuntary: sw1.involuntary - sw0.involuntary },
    counters,
  };
}

// ---- the profile ----

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  samples: number[];
  timeDeltas: number[];
}

interface Fn {
  name: string;
  where: string;
  self: number;
  total: number;
}

/**
 * tsx compiles each file to one minified line, so a frame's line means nothing until mapped back:
 * load the same src/ modules here (through the same tsx) and ask their source maps. A file edited
 * since `since` (ms) may map wrongly; those are listed in `changed`.
 */
async function locator(urls: Iterable<string>, since: number, changed: string[]): Promise<(f: CallFrame) => string> {
  const src = pathToFileURL(join(REPO, 'src/')).href;
  const maps = new Map<string, ReturnType<typeof findSourceMap>>();
  for (const url of urls) {
    if (!url.startsWith(src) || url.endsWith('/cli/main.ts')) continue; // main.ts runs the CLI on import
    try {
      if (statSync(fileURLToPath(url)).mtimeMs > since) changed.push(relative(REPO, fileURLToPath(url)));
      await import(url);
      maps.set(url, findSourceMap(url));
    } catch {
      // left unmapped
    }
  }
  return (f) => {
    const file = f.url.startsWith('file://') ? relative(REPO, fileURLToPath(f.url)) : f.url;
    const m = maps.get(f.url)?.findEntry(f.lineNumber, f.columnNumber);
    if (m && 'originalLine' in m) return `${file}:${m.originalLine + 1}`;
    return `${file}:${f.lineNumber + 1}${f.url.startsWith('file://') ? `:${f.columnNumber + 1}` : ''}`;
  };
}

interface ProfileSummary {
  samples: number;
  seconds: number;
  special: Map<string, number>;
  fns: Fn[];
  files: Map<string, number>;
  /** For each function, its self samples by calling function (to tell native calls apart). */
  callers: Map<Fn, Map<Fn, number>>;
  /** The idle share of each tenth of the run, percent: shows when the main thread starts waiting. */
  idleBySlice: number[];
  /** src/ files edited after the server started (their lines may be off). */
  changed: string[];
}

const SLICES = 10;

async function summarize(path: string, fromUs: number, toUs: number, startedMs: number): Promise<ProfileSummary> {
  const prof = JSON.parse(readFileSync(path, 'utf8')) as CpuProfile;
  const parent = new Map<number, number>();
  for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  // Samples per node, within the fio run only.
  const hits = new Map<number, number>();
  const idleId = prof.nodes.find((n) => n.callFrame.functionName === '(idle)')?.id;
  const slice = Array.from({ length: SLICES }, () => ({ idle: 0, all: 0 }));
  let t = prof.startTime;
  let samples = 0;
  for (let i = 0; i < prof.samples.length; i++) {
    t += prof.timeDeltas[i]!;
    if (t < fromUs || t > toUs) continue;
    const id = prof.samples[i]!;
    hits.set(id, (hits.get(id) ?? 0) + 1);
    samples++;
    const sl = slice[Math.min(SLICES - 1, Math.floor(((t - fromUs) / (toUs - fromUs)) * SLICES))]!;
    sl.all++;
    if (id === idleId) sl.idle++;
  }
  const changed: string[] = [];
  const where = await locator(new Set(prof.nodes.map((n) => n.callFrame.url)), startedMs, changed);
  const keyOf = new Map<number, string>();
  const fns = new Map<string, Fn>();
  for (const n of prof.nodes) {
    const name = n.callFrame.functionName || '(anonymous)';
    const w = n.callFrame.url ? where(n.callFrame) : '';
    const key = `${name}\0${w}`;
    keyOf.set(n.id, key);
    if (!fns.has(key)) fns.set(key, { name, where: w, self: 0, total: 0 });
  }
  const files = new Map<string, number>();
  const callers = new Map<Fn, Map<Fn, number>>();
  for (const [id, count] of hits) {
    const fn = fns.get(keyOf.get(id)!)!;
    fn.self += count;
    const up = parent.get(id);
    if (up !== undefined) {
      const by = callers.get(fn) ?? new Map<Fn, number>();
      const caller = fns.get(keyOf.get(up)!)!;
      by.set(caller, (by.get(caller) ?? 0) + count);
      callers.set(fn, by);
    }
    const file = fn.where ? fn.where.replace(/:\d+(:\d+)?$/, '') : fn.name.startsWith('(') ? fn.name : '(native)';
    files.set(file, (files.get(file) ?? 0) + count);
    // Inclusive: every function on the stack, once per sample even when recursive.
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const k = keyOf.get(cur)!;
      if (!seen.has(k)) {
        seen.add(k);
        fns.get(k)!.total += count;
      }
    }
  }
  const special = new Map<string, number>();
  for (const s of ['(idle)', '(program)', '(garbage collector)']) special.set(s, fns.get(`${s}\0`)?.self ?? 0);
  return {
    samples,
    seconds: (toUs - fromUs) / 1e6,
    special,
    fns: [...fns.values()].filter((f) => f.self > 0 || f.total > 0),
    files,
    callers,
    idleBySlice: slice.map((x) => (x.all ? Math.round((x.idle / x.all) * 100) : 0)),
    changed,
  };
}

// ---- the report ----

const pct = (n: number, of: number): string => (of > 0 ? ((n / of) * 100).toFixed(1).padStart(5) : '    -');
const num = (n: number, digits = 0): string => n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });

function fioLine(label: string, m: Measured): string {
  const f = m.fio;
  const cpu = m.cpu - (m.threads.get('v8:ProfEvntProc') ?? 0);
  return (
    `${label.padEnd(14)} ${num(f.iops).padStart(8)} IOPS  ${num(f.mibps, 1).padStart(6)} MiB/s  mean ${num(f.meanLatNs / 1000)} µs  ` +
    `p99 ${num(f.p99LatNs / 1000)} µs  server CPU ${num((cpu / f.ios) * 1e6, 1)} µs/request (profiler thread excluded)`
  );
}

function render(opts: Options, job: FioJob, cmd: string, pc: Measured, nbdkit: Measured | string | null, prof: ProfileSummary, profPath: string): string {
  const L: string[] = [];
  const secs = pc.wall;
  L.push(`pcache CPU profile: ${opts.case}, ${job.bs / KiB} KiB, qd${job.iodepth}, ${opts.runtime} s (fio: ${cmd})`);
  L.push('');
  L.push(fioLine('pcache', pc));
  if (typeof nbdkit === 'string') L.push(`nbdkit memory  failed: ${nbdkit}`);
  else if (nbdkit) L.push(fioLine('nbdkit memory', nbdkit));
  // Node's other threads (libuv pool, V8 platform workers) keep the program's name; the profiler's own is v8:ProfEvntProc.
  const cpu = [...pc.threads].filter(([, v]) => v > 0.005).sort((a, b) => b[1] - a[1]);
  const all = pc.cpu;
  const threadName = (k: string): string => (k === 'node' ? 'libuv pool + V8 workers' : k === 'v8:ProfEvntProc' ? 'profiler' : k);
  L.push(`server CPU: ${num(all / secs, 2)} cores (${cpu.map(([k, v]) => `${threadName(k)} ${num(v / secs, 2)}`).join(', ')})`);
  L.push(`            fio ${num(pc.fioCpu / secs, 2)} cores; everything else on the machine ${num(pc.othersCpu / secs, 2)} cores (load ${loadAverage()})`);
  L.push(`            ${num((all / pc.fio.ios) * 1e6, 1)} µs of server CPU per request (main thread ${num(((pc.threads.get('main thread') ?? 0) / pc.fio.ios) * 1e6, 1)} µs)`);
  const perReq = (x: number): string => num(x / pc.fio.ios, 2);
  L.push(`            main thread context switches per request: ${perReq(pc.switches.voluntary)} waits, ${perReq(pc.switches.involuntary)} preemptions`);
  if (pc.counters) L.push(`pcache counters over the run: ${pc.counters}`);
  L.push('');
  const n = prof.samples;
  const sp = (k: string): number => prof.special.get(k) ?? 0;
  const rest = n - sp('(idle)') - sp('(program)') - sp('(garbage collector)');
  L.push(`profile: ${relative(process.cwd(), profPath)}, ${num(n)} samples over the fio run (${num(prof.seconds, 1)} s, every ${opts.intervalUs} µs)`);
  L.push(`  idle ${pct(sp('(idle)'), n)}%   GC ${pct(sp('(garbage collector)'), n)}%   program ${pct(sp('(program)'), n)}%   JS + native calls ${pct(rest, n)}%`);
  L.push(`  idle % by tenth of the run: ${prof.idleBySlice.join(' ')}`);
  if (prof.changed.length) L.push(`  NOTE: edited since the server started, so their lines may be off: ${prof.changed.join(', ')}`);
  L.push('');
  L.push('top 30 functions by self time (% of samples; total = inclusive):');
  L.push(`  ${'self%'.padStart(5)} ${'total%'.padStart(6)}  function`.padEnd(52) + 'location');
  const top = [...prof.fns].sort((a, b) => b.self - a.self).slice(0, 30);
  for (const f of top) L.push(`  ${pct(f.self, n)}  ${pct(f.total, n)}  ${f.name.slice(0, 40).padEnd(42)}${f.where || '(native)'}`);
  L.push('');
  L.push('the hottest native calls, by caller (% of samples):');
  const natives = top.filter((f) => !f.where && !f.name.startsWith('(')).slice(0, 6);
  for (const f of natives) {
    const by = [...(prof.callers.get(f) ?? [])].sort((a, b) => b[1] - a[1]).filter(([, c]) => c / n >= 0.002).slice(0, 4);
    L.push(`  ${f.name} ${pct(f.self, n).trim()}: ${by.map(([c, k]) => `${c.name} ${c.where || '(native)'} ${pct(k, n).trim()}`).join('; ')}`);
  }
  L.push('');
  L.push('top 20 src/ functions by total (inclusive) time:');
  const inc = prof.fns.filter((f) => f.where.startsWith('src/')).sort((a, b) => b.total - a.total).slice(0, 20);
  for (const f of inc) L.push(`  ${pct(f.total, n)}  ${pct(f.self, n)}  ${f.name.slice(0, 40).padEnd(42)}${f.where || '(native)'}`);
  L.push('');
  L.push('self time by file:');
  for (const [file, c] of [...prof.files].sort((a, b) => b[1] - a[1]).slice(0, 15)) L.push(`  ${pct(c, n)}  ${file}`);
  return L.join('\n') + '\n';
}

// ---- main ----

async function waitForFile(path: string, ms: number): Promise<boolean> {
  for (const end = Date.now() + ms; Date.now() < end; await sleep(100)) if (existsSync(path)) return true;
  return existsSync(path);
}

async function main(): Promise<void> {
  const opts = parseOptions();
  await initClockTicks();
  mkdirSync(opts.out, { recursive: true });
  const tmp = mkdtempSync(join(opts.dir, 'pcache-profile-'));
  const cleanup = (): void => {
    for (const c of children) c.kill('SIGKILL');
    rmSync(tmp, { recursive: true, force: true });
  };
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  try {
    const c = makeCase(CASES[opts.case], 4 * KiB, 32, 1);
    const job = jobFor(c, opts.runtime, 0);
    const cacheDev = join(tmp, 'cache.img');
    const backing = join(tmp, 'backing.img');
    await sparseFile(cacheDev, opts.cacheGiB * GiB);
    await sparseFile(backing, 4 * GiB);
    const runDir = join(tmp, 'run');
    mkdirSync(runDir);
    process.env.PCACHE_RUN_DIR = runDir; // where this process finds the server's control socket
    const profName = `pcache-${opts.case}.cpuprofile`;
    const profPath = join(opts.out, profName);
    rmSync(profPath, { force: true });
    const startedMs = Date.now();

    const pcache = await startPcache({
      id: 'pcache',
      label: 'pcache',
      repo: REPO,
      socket: join(tmp, 'pcache.sock'),
      cacheDev,
      backingDev: backing,
      backingFiles: [backing],
      runDir,
      log: join(opts.out, 'pcache.log'),
      nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${opts.out}`, `--cpu-prof-name=${profName}`, `--cpu-prof-interval=${opts.intervalUs}`],
    });
    let pc: Measured;
    try {
      process.stderr.write(`pcache: ${opts.case} for ${opts.runtime} s ...\n`);
      pc = await measure(pcache, opts.case, job, tmp);
    } finally {
      await pcache.stop(); // `pcache stop` over the control socket: a clean exit writes the profile
    }
    if (!(await waitForFile(profPath, 10_000))) throw new Error(`no profile at ${profPath} (see ${join(opts.out, 'pcache.log')})`);

    let nbdkit: Measured | string | null = null;
    if (opts.nbdkit) {
      process.stderr.write(`nbdkit memory: ${opts.case} for ${opts.runtime} s ...\n`);
      try {
        const mem = await startNbdkit({ id: 'memory', label: 'nbdkit memory', socket: join(tmp, 'memory.sock'), args: ['memory', '4G'], files: [], tmpdir: tmp, log: join(tmp, 'nbdkit.log') });
        try {
          nbdkit = await measure(mem, opts.case, job, tmp);
        } finally {
          await mem.stop();
        }
      } catch (err) {
        nbdkit = err instanceof Error ? err.message : String(err);
      }
    }

    const prof = await summarize(profPath, pc.fromUs, pc.toUs, startedMs);
    const text = render(opts, job, fioCommand(job, 'nbd+unix:///?socket=SOCK', 'OUT.json'), pc, nbdkit, prof, profPath);
    writeFileSync(join(opts.out, 'summary.txt'), text);
    process.stdout.write(text);
  } finally {
    cleanup();
  }
}

await main();
