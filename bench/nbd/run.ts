/**
 * pcache's NBD benchmark: pcache and the nbdkit references side by side in one run, driven by fio's
 * nbd engine over unix sockets; writes BENCHMARKS.md and bench/nbd/results.json.
 *
 *   node --import tsx bench/nbd/run.ts [--quick] [--runtime S] [--dir DIR] [--cache-size SIZE]
 *                                      [--servers a,b] [--filter TEXT] [--md FILE] [--json FILE]
 *   node --import tsx bench/nbd/run.ts --case NAME[,NAME...]|all [--runtime S] [--sustain-seconds S]
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { EXPORT_SIZE, jobFor, makePlan, MAX_UNCACHED, primeJob, primeWritesJob, REGION, warmJob, type CaseResult, type CaseSpec, type DrainResult, type Kind, type Results, type Section, type ServerRecord } from './cases.js';
import { fioCommand, runFio, type FioJob } from './fio.js';
import { renderMarkdown, targetLines } from './report.js';
import { parseScenarioList, renderScenarios, runScenarios, SCENARIO_END, SCENARIO_START, SCENARIOS, spliceScenarios, type ScenarioName, type ScenarioResults } from './scenarios.js';
import { commandLine, pcacheFlush, pcacheStats, startNbdkit, startPcache, type Server } from './servers.js';
import {
  children,
  cpuSeconds,
  dropFileCache,
  fillFile,
  GiB,
  initClockTicks,
  KiB,
  loadAverage,
  machineInfo,
  MiB,
  ownCpuSeconds,
  parseSize,
  run,
  sleep,
  sparseFile,
  syncFile,
  systemBusySeconds,
} from './sys.js';

const REPO = fileURLToPath(new URL('../../', import.meta.url));
const HERE = fileURLToPath(new URL('./', import.meta.url));

const HELP = `usage: node --import tsx bench/nbd/run.ts [options]

Benchmark pcache serve against nbdkit (memory, file, delay, cache filter) with fio's nbd engine,
all on unix sockets, and write BENCHMARKS.md plus bench/nbd/results.json.

  --quick            ~3 s per case and a subset of the cases, to check the harness
  --runtime S        seconds per case (default 10, or 3 with --quick)
  --dir DIR          where the temporary directory goes (default: ${tmpdir()}); it is removed at the end
  --cache-size SIZE  pcache's cache device, e.g. 1G or 1536M (default 1G)
  --servers LIST     only these: memory,file,pcache,slow,nbdkit-cache,nbdkit-cache-4k,
                     pcache-slow,drain
  --filter TEXT      only the cases whose id contains TEXT (e.g. randwrite-4k)
  --md FILE          where the report goes (default: BENCHMARKS.md for a full run,
                     bench/nbd/out/BENCHMARKS.md for --quick, --servers or --filter)
  --json FILE        where the raw results go (default: bench/nbd/results.json, or bench/nbd/out/)

  --case LIST        instead of the tables above, run these cases, each a ratio from one run
                     (comma-separated, or all): ${SCENARIOS.join(', ')}.
                     They go into their own section of BENCHMARKS.md (other cases' rows are kept)
                     and bench/nbd/scenarios.json.
  --sustain-seconds S  length of the sustained-randwrite runs (default 90; the last third counts)
`;

const ALL_SERVERS = ['memory', 'file', 'pcache', 'slow', 'nbdkit-cache', 'nbdkit-cache-4k', 'pcache-slow', 'drain'];

interface Options {
  quick: boolean;
  runtime: number;
  dir: string;
  cacheSize: number;
  servers: Set<string>;
  filter: string | null;
  md: string;
  json: string;
  cases: ScenarioName[] | null;
  sustainSeconds: number;
}

function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      runtime: { type: 'string' },
      dir: { type: 'string' },
      'cache-size': { type: 'string' },
      servers: { type: 'string' },
      filter: { type: 'string' },
      md: { type: 'string' },
      json: { type: 'string' },
      case: { type: 'string' },
      'sustain-seconds': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(HELP);
    return null;
  }
  const quick = values.quick ?? false;
  const runtime = values.runtime !== undefined ? Number(values.runtime) : quick ? 3 : 10;
  if (!Number.isInteger(runtime) || runtime < 1) throw new Error(`--runtime takes whole seconds, not '${values.runtime}'`);
  const servers = new Set(values.servers ? values.servers.split(',').map((s) => s.trim()) : ALL_SERVERS);
  for (const s of servers) if (!ALL_SERVERS.includes(s)) throw new Error(`--servers: unknown server '${s}' (known: ${ALL_SERVERS.join(', ')})`);
  const cacheSize = parseSize(values['cache-size'] ?? '1G');
  if (cacheSize < 512 * MiB) throw new Error('--cache-size must be at least 512M');
  const cases = values.case !== undefined ? parseScenarioList(values.case) : null;
  const sustainSeconds = Number(values['sustain-seconds'] ?? 90);
  if (!Number.isInteger(sustainSeconds) || sustainSeconds < 3) throw new Error(`--sustain-seconds takes whole seconds >= 3, not '${values['sustain-seconds']}'`);
  const partial = quick || values.servers !== undefined || values.filter !== undefined;
  const outDir = join(HERE, 'out');
  return {
    quick,
    runtime,
    dir: resolve(values.dir ?? tmpdir()),
    cacheSize,
    servers,
    filter: values.filter ?? null,
    md: resolve(values.md ?? (partial ? join(outDir, 'BENCHMARKS.md') : join(REPO, 'BENCHMARKS.md'))),
    json: resolve(values.json ?? (cases ? join(HERE, 'scenarios.json') : partial ? join(outDir, 'results.json') : join(HERE, 'results.json'))),
    cases,
    sustainSeconds,
  };
}

const runStart = performance.now();

function log(text: string): void {
  const s = (performance.now() - runStart) / 1000;
  const stamp = `${String(Math.floor(s / 60)).padStart(2, '0')}:${(s % 60).toFixed(0).padStart(2, '0')}`;
  process.stderr.write(text.startsWith('\n') || text === '' ? text + '\n' : `${stamp} ${text}\n`);
}

function fmtNum(n: number, digits = 0): string {
  return n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

// ---- interruption: every child ends and the temporary directory goes, whatever happens ----

let tempDir: string | null = null;
let interrupted = false;

function removeTemp(): void {
  if (tempDir) {
    try {
      rmSync(tempDir, { recursive: true, force: true });
    } catch {
      // best effort
    }
    tempDir = null;
  }
}

async function endChildren(): Promise<void> {
  const live = [...children];
  for (const c of live) c.kill('SIGTERM');
  const deadline = Date.now() + 10_000;
  while (children.size > 0 && Date.now() < deadline) await sleep(50);
  for (const c of children) c.kill('SIGKILL');
}

function installCleanup(): void {
  const onSignal = (sig: NodeJS.Signals): void => {
    if (interrupted) {
      for (const c of children) c.kill('SIGKILL');
      removeTemp();
      process.exit(130);
    }
    interrupted = true;
    log(`\n${sig}: stopping the servers and removing the temporary files (again to force)`);
    void endChildren().then(() => {
      removeTemp();
      process.exit(130);
    });
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  process.on('exit', () => {
    for (const c of children) c.kill('SIGKILL');
    removeTemp();
  });
}

// ---- the run ----

interface Ctx {
  opts: Options;
  tmp: string;
  backing: string;
  drainSource: string;
  runDir: string;
  results: Results;
  done: number;
  total: number;
}

interface ServerDef {
  id: string;
  label: string;
  /** Write the write region once before the write cases (nbdkit memory allocates on first write). */
  primeWrites?: boolean;
  start(): Promise<Server>;
}

const KIND_ORDER: Kind[] = ['randwrite', 'seqwrite', 'cachedread', 'uncachedread'];

function ordered(cases: CaseSpec[]): CaseSpec[] {
  return [...cases].sort((a, b) => KIND_ORDER.indexOf(a.kind) - KIND_ORDER.indexOf(b.kind));
}

function isRead(kind: Kind): boolean {
  return kind === 'cachedread' || kind === 'uncachedread';
}

async function freshCache(path: string, size: number): Promise<void> {
  await fsp.rm(path, { force: true });
  await sparseFile(path, size);
}

async function runCase(ctx: Ctx, section: Section, server: Server, c: CaseSpec, job: FioJob, settle: boolean): Promise<CaseResult> {
  const out = join(ctx.tmp, `fio-${server.id}-${c.id}.json`);
  const base = emptyCase(section, server, c, null, fioCommand(job, server.uri, out));
  ctx.done++;
  const tag = `[${ctx.done}/${ctx.total}] ${server.id.padEnd(12)} ${c.label}`;
  try {
    if (c.kind === 'uncachedread') await server.dropCaches();
    const before = server.cacheDev && isRead(c.kind) ? await pcacheStats(server.cacheDev) : null;
    const pids = server.pids();
    const cpu0 = cpuSeconds(pids);
    const own0 = ownCpuSeconds();
    const busy0 = systemBusySeconds();
    const start = performance.now();
    const fio = await runFio(job, server.uri, out);
    base.wallSeconds = (performance.now() - start) / 1000;
    const cpu = cpuSeconds(pids) - cpu0;
    const own1 = ownCpuSeconds();
    const busy = systemBusySeconds() - busy0;
    base.fio = fio;
    base.cpuSeconds = cpu;
    base.fioCpuSeconds = own1.children - own0.children;
    base.otherCores = Math.max(0, busy - cpu - base.fioCpuSeconds - (own1.self - own0.self)) / base.wallSeconds;
    base.cpuPer100k = fio.ios > 0 ? (cpu / fio.ios) * 100_000 : null;
    if (before && server.cacheDev) {
      const after = await pcacheStats(server.cacheDev);
      const reads = after.reads - before.reads;
      base.hitPct = reads > 0 ? ((after.readHits - before.readHits) / reads) * 100 : null;
    }
    const lat = (ns: number): string => (ns >= 1e6 ? `${fmtNum(ns / 1e6, 2)} ms` : `${fmtNum(ns / 1e3, 0)} µs`);
    log(
      `${tag}: ${fmtNum(fio.iops)} IOPS, ${fmtNum(fio.mibps, 1)} MiB/s, mean ${lat(fio.meanLatNs)}, p99 ${lat(fio.p99LatNs)}, ` +
        `cpu ${fmtNum(base.cpuPer100k ?? 0, 2)} s/100k${base.hitPct !== null ? `, hits ${fmtNum(base.hitPct, 1)}%` : ''}` +
        (base.otherCores > 0.25 ? ` (others used ${fmtNum(base.otherCores, 2)} cores meanwhile)` : ''),
    );
    if (settle && !isRead(c.kind)) await server.settle();
  } catch (err) {
    base.error = err instanceof Error ? err.message : String(err);
    log(`${tag}: ERROR ${base.error}`);
  }
  return base;
}

/**
 * Run cases on each server in turn. Normally one server start takes all the cases, with a flush
 * after each write case; with `freshPerCase` every case gets a freshly started server (and, for
 * pcache, a fresh cache device) and nothing is flushed: through a slow backing a flush takes longer
 * than the case.
 */
async function runSection(ctx: Ctx, section: Section, defs: ServerDef[], cases: CaseSpec[], freshPerCase = false): Promise<void> {
  const all = ordered(cases);
  // Each uncached-read case has its own region, the same one on every server.
  const uncachedIndex = new Map(all.filter((c) => c.kind === 'uncachedread').map((c, i) => [c.id, i]));
  for (const def of defs) {
    if (freshPerCase) {
      for (const c of all) await runOnServer(ctx, section, def, [c], uncachedIndex, false);
    } else {
      await runOnServer(ctx, section, def, all, uncachedIndex, true);
    }
  }
}

function serverRecord(ctx: Ctx, section: Section, id: string, label: string, commands: string[]): ServerRecord {
  let rec = ctx.results.servers.find((s) => s.section === section && s.id === id);
  if (!rec) {
    rec = { section, id, label, commands, error: null };
    ctx.results.servers.push(rec);
  }
  return rec;
}

/** A case with nothing measured yet: `error` says why nothing will be, `command` what will run. */
function emptyCase(section: Section, server: { id: string; label: string }, c: CaseSpec, error: string | null, command = ''): CaseResult {
  return {
    section,
    caseId: c.id,
    label: c.label,
    kind: c.kind,
    server: server.id,
    serverLabel: server.label,
    fio: null,
    cpuSeconds: null,
    cpuPer100k: null,
    fioCpuSeconds: null,
    otherCores: null,
    wallSeconds: 0,
    hitPct: null,
    command,
    error,
  };
}

async function runOnServer(ctx: Ctx, section: Section, def: ServerDef, cases: CaseSpec[], uncachedIndex: Map<string, number>, settle: boolean): Promise<void> {
  if (interrupted) return;
  let server: Server;
  log(`-- starting ${def.label}`);
  try {
    server = await def.start();
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    log(`-- ${def.id} did not start: ${msg}`);
    serverRecord(ctx, section, def.id, def.label, []).error = msg;
    for (const c of cases) {
      ctx.done++;
      ctx.results.cases.push(emptyCase(section, def, c, `the server did not start: ${msg.split('\n')[0]}`));
    }
    return;
  }
  const rec = serverRecord(ctx, section, server.id, server.label, server.commands);
  try {
    let primed: string | null = null;
    if (def.primeWrites && cases.some((c) => !isRead(c.kind))) {
      log(`   writing ${def.id}'s write region once first`);
      await runFio(primeWritesJob(), server.uri, join(ctx.tmp, `fio-${server.id}-prime-writes.json`));
    }
    for (const [i, c] of cases.entries()) {
      if (interrupted) return;
      if (c.kind === 'cachedread' && primed === null) {
        try {
          await runFio(primeJob(), server.uri, join(ctx.tmp, `fio-${server.id}-prime.json`));
          await server.settle();
          const before = server.cacheDev ? await pcacheStats(server.cacheDev) : null;
          await runFio(warmJob(), server.uri, join(ctx.tmp, `fio-${server.id}-warm.json`));
          if (before && server.cacheDev) {
            const after = await pcacheStats(server.cacheDev);
            const bytes = after.readBytes - before.readBytes;
            rec.primedHitPct = bytes > 0 ? ((after.readHitBytes - before.readHitBytes) / bytes) * 100 : null;
            log(`   the primed region was ${fmtNum(rec.primedHitPct ?? 0, 1)}% in the cache when first read back after the flush`);
          }
          primed = '';
        } catch (err) {
          primed = `priming the cached region failed: ${err instanceof Error ? err.message : String(err)}`;
        }
      }
      if (c.kind === 'cachedread' && primed) {
        ctx.done++;
        ctx.results.cases.push(emptyCase(section, server, c, primed));
        continue;
      }
      const job = jobFor(c, ctx.opts.runtime, uncachedIndex.get(c.id) ?? 0);
      // nbdkit's cache filter keeps its cache in a temporary file: its FLUSH writes every cached
      // block back through the 2 ms delay, one by one (5 minutes after 10 s of 4K writes), so its
      // rows stay without the final FLUSH, as a cache that promises no durability of its own.
      if (def.id.startsWith('nbdkit-cache')) job.endFsync = false;
      // No flush after the server's last case: it stops next.
      ctx.results.cases.push(await runCase(ctx, section, server, c, job, settle && i < cases.length - 1));
    }
  } finally {
    log(`-- stopping ${def.id}`);
    await server.stop().catch((err) => {
      rec.error = `stop failed: ${err instanceof Error ? err.message : String(err)}`;
      log(`-- ${rec.error}`);
    });
  }
}

function nbdkitDef(ctx: Ctx, id: string, label: string, args: string[], primeWrites = false): ServerDef {
  return {
    id,
    label,
    primeWrites,
    start: () =>
      startNbdkit({ id, label, socket: join(ctx.tmp, `${id}.sock`), args, files: args.includes('file') ? [ctx.backing] : [], tmpdir: ctx.tmp, log: join(ctx.tmp, `${id}.log`) }),
  };
}

const SLOW_ARGS = ['delay-write=2ms', 'delay-read=2ms'];

function slowArgs(ctx: Ctx): string[] {
  return ['--filter=delay', 'file', ctx.backing, ...SLOW_ARGS];
}

function pcacheDef(ctx: Ctx, id: string, label: string, cacheName: string, below?: () => Promise<Server>): ServerDef {
  return {
    id,
    label,
    async start() {
      const cacheDev = join(ctx.tmp, cacheName);
      await freshCache(cacheDev, ctx.opts.cacheSize);
      const under = below ? await below() : undefined;
      return startPcache({
        id,
        label,
        repo: REPO,
        socket: join(ctx.tmp, `${id}.sock`),
        cacheDev,
        backingDev: under ? under.uri : ctx.backing,
        backingFiles: [ctx.backing],
        below: under,
        runDir: ctx.runDir,
        log: join(ctx.tmp, `${id}.log`),
      });
    },
  };
}

/** pcache in front of the slow (delayed) backing, when serve takes an NBD URI as its backing device. */
async function slowPcacheDef(ctx: Ctx): Promise<ServerDef> {
  const localLabel = 'pcache (backing: local file, no delay)';
  if (!existsSync(join(REPO, 'src/backing/nbd.ts'))) {
    ctx.results.slowBackingNote = 'pcache serve cannot yet use an NBD server as its backing device (no src/backing/nbd.ts), so its backing device in this row is the local backing file, without the 2 ms delay.';
    return pcacheDef(ctx, 'pcache-slow', localLabel, 'cache-slow.img');
  }
  const nbd = pcacheDef(ctx, 'pcache-slow', 'pcache -> nbdkit delay', 'cache-slow.img', () => nbdkitDef(ctx, 'pcache-slow-below', 'nbdkit delay (pcache backing)', slowArgs(ctx)).start());
  return {
    id: nbd.id,
    label: nbd.label,
    async start() {
      try {
        const s = await nbd.start();
        ctx.results.slowBackingNote = "pcache's backing device in this row is the slow nbdkit delay export (nbd+unix URI), the same as the references.";
        return s;
      } catch (err) {
        ctx.results.slowBackingNote =
          `pcache serve did not start with an NBD URI as its backing device (${(err instanceof Error ? err.message : String(err)).split('\n')[0]}), ` +
          'so its backing device in this row is the local backing file, without the 2 ms delay.';
        log(`-- ${ctx.results.slowBackingNote}`);
        const local = pcacheDef(ctx, 'pcache-slow', localLabel, 'cache-slow.img');
        return local.start();
      }
    },
  };
}

async function runDrain(ctx: Ctx): Promise<DrainResult> {
  const bytes = ctx.results.plan.drainBytes;
  const useNbd = existsSync(join(REPO, 'src/backing/nbd.ts'));
  const res: DrainResult = {
    burstBytes: bytes,
    burstMiBps: null,
    burstSeconds: null,
    dirtyAtFlush: null,
    flushedBytes: null,
    flushSeconds: null,
    pcacheMiBps: null,
    pcacheCpuSeconds: null,
    nbdcopySeconds: null,
    nbdcopyMiBps: null,
    nbdcopyCpuSeconds: null,
    backing: '',
    commands: [],
    error: null,
  };
  const fileBelow = (): Promise<Server> => nbdkitDef(ctx, 'drain-below', 'nbdkit file (pcache backing)', ['file', ctx.backing]).start();
  log(`-- write-back drain: ${bytes / MiB} MiB random-write burst into pcache, then flush; nbdcopy of the same size`);
  try {
    let pcache: Server;
    try {
      pcache = await pcacheDef(ctx, 'drain', 'pcache', 'cache-drain.img', useNbd ? fileBelow : undefined).start();
      res.backing = useNbd ? 'nbdkit file export of the backing file (nbd+unix URI)' : 'the local backing file';
    } catch (err) {
      if (!useNbd) throw err;
      pcache = await pcacheDef(ctx, 'drain', 'pcache', 'cache-drain.img').start();
      res.backing = 'the local backing file (serve did not take an NBD URI)';
    }
    res.commands.push(...pcache.commands);
    try {
      const burst: FioJob = { name: 'drain-burst', rw: 'randwrite', bs: 64 * KiB, iodepth: 32, numjobs: 1, offset: 0, size: bytes, runtime: null };
      const out = join(ctx.tmp, 'fio-drain-burst.json');
      res.commands.push(fioCommand(burst, pcache.uri, out));
      const f = await runFio(burst, pcache.uri, out);
      res.burstMiBps = f.mibps;
      res.burstSeconds = f.seconds;
      const s0 = await pcacheStats(pcache.cacheDev!);
      const pids = pcache.pids();
      const cpu0 = cpuSeconds(pids);
      const t0 = performance.now();
      await pcacheFlush(pcache.cacheDev!);
      res.flushSeconds = (performance.now() - t0) / 1000;
      res.pcacheCpuSeconds = cpuSeconds(pids) - cpu0;
      const s1 = await pcacheStats(pcache.cacheDev!);
      res.dirtyAtFlush = s0.dirtyBytes;
      res.flushedBytes = s1.writtenBackBytes - s0.writtenBackBytes;
      res.pcacheMiBps = res.flushedBytes / MiB / res.flushSeconds;
      res.commands.push(`pcache flush ${pcache.cacheDev} (the control request, timed in the benchmark process)`);
      log(
        `   burst ${fmtNum(f.mibps, 1)} MiB/s; at flush ${fmtNum(s0.dirtyBytes / MiB, 1)} MiB dirty; flush wrote back ${fmtNum(res.flushedBytes / MiB, 1)} MiB ` +
          `in ${fmtNum(res.flushSeconds, 2)} s = ${fmtNum(res.pcacheMiBps, 1)} MiB/s`,
      );
    } finally {
      await pcache.stop();
    }
    await syncFile(ctx.backing);
    const target = await nbdkitDef(ctx, 'drain-target', 'nbdkit file', ['file', ctx.backing]).start();
    try {
      const args = ['--flush', ctx.drainSource, target.uri];
      res.commands.push(...target.commands, commandLine('nbdcopy', args));
      const pids = target.pids();
      const cpu0 = cpuSeconds(pids);
      const t0 = performance.now();
      const r = await run('nbdcopy', args);
      res.nbdcopySeconds = (performance.now() - t0) / 1000;
      res.nbdcopyCpuSeconds = cpuSeconds(pids) - cpu0;
      if (r.code !== 0) throw new Error(`nbdcopy exited ${r.code}: ${r.stderr.trim()}`);
      res.nbdcopyMiBps = bytes / MiB / res.nbdcopySeconds;
      log(`   nbdcopy ${bytes / MiB} MiB in ${fmtNum(res.nbdcopySeconds, 2)} s = ${fmtNum(res.nbdcopyMiBps, 1)} MiB/s`);
    } finally {
      await target.stop();
    }
  } catch (err) {
    res.error = err instanceof Error ? err.message : String(err);
    log(`   drain ERROR ${res.error}`);
  }
  return res;
}

async function preflight(): Promise<void> {
  const missing: string[] = [];
  for (const [cmd, args, pkg] of [
    ['fio', ['--version'], 'fio'],
    ['nbdkit', ['--version'], 'nbdkit'],
    ['nbdcopy', ['--version'], 'libnbd-bin'],
    ['dd', ['--version'], 'coreutils'],
  ] as const) {
    const r = await run(cmd, args).catch(() => null);
    if (!r || r.code !== 0) missing.push(`${cmd} (apt-get install ${pkg})`);
  }
  if (missing.length) throw new Error(`missing tools: ${missing.join(', ')}`);
  const fio = await run('fio', ['--enghelp=nbd']);
  if (fio.code !== 0) throw new Error("this fio has no nbd engine (install a fio built with libnbd, e.g. Debian's fio)");
  const plugins = await run('nbdkit', ['--filter=delay', '--filter=cache', 'memory', '--dump-plugin']);
  if (plugins.code !== 0) throw new Error(`nbdkit lacks the memory plugin or the delay/cache filters: ${plugins.stderr.trim()}`);
}

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  if (!opts) return 0;
  await preflight();
  await initClockTicks();
  installCleanup();
  mkdirSync(opts.dir, { recursive: true });
  const tmp = mkdtempSync(join(opts.dir, 'pcache-bench-'));
  tempDir = tmp;
  const runDir = join(tmp, 'run');
  mkdirSync(runDir);
  // The control client in this process finds the servers' sockets here.
  process.env.PCACHE_RUN_DIR = runDir;

  if (opts.cases) return runCases(opts, tmp, runDir);

  const plan = makePlan(opts.quick, opts.runtime);
  const pick = (cases: CaseSpec[]): CaseSpec[] => (opts.filter ? cases.filter((c) => c.id.includes(opts.filter!)) : cases);
  plan.main = pick(plan.main);
  plan.slow = pick(plan.slow);
  const mainDefsIds = ['memory', 'file', 'pcache'].filter((s) => opts.servers.has(s));
  const slowIds = ['slow', 'nbdkit-cache', 'nbdkit-cache-4k', 'pcache-slow'].filter((s) => opts.servers.has(s));
  const runDrainToo = opts.servers.has('drain') && opts.filter === null;

  const results: Results = {
    startedAt: new Date().toISOString(),
    finishedAt: '',
    machine: await machineInfo(tmp, REPO),
    argv: process.argv.slice(2),
    plan,
    dir: tmp,
    cacheSize: opts.cacheSize,
    slowBackingNote: '',
    servers: [],
    cases: [],
    drain: null,
  };
  const ctx: Ctx = {
    opts,
    tmp,
    backing: join(tmp, 'backing.img'),
    drainSource: join(tmp, 'drain-source.img'),
    runDir,
    results,
    done: 0,
    total: plan.main.length * mainDefsIds.length + plan.slow.length * slowIds.length,
  };
  const estimate = (ctx.total * (opts.runtime + 2.5) + (runDrainToo ? 40 : 0) + 40) / 60;
  log(`pcache NBD benchmark: ${ctx.total} cases of ${opts.runtime} s${runDrainToo ? ' and the drain test' : ''}, about ${fmtNum(estimate, 0)} min; files in ${tmp}`);

  // The backing file: 8 GiB, sparse except for the write region (so that writes to it overwrite,
  // as in nbdkit memory after its priming pass) and the uncached-read regions, which hold data that
  // is then dropped from the page cache.
  const uncachedCases = mainDefsIds.length > 0 ? plan.main.filter((c) => c.kind === 'uncachedread').length : 0;
  if (uncachedCases > MAX_UNCACHED) throw new Error('too many uncached-read cases for the export');
  await sparseFile(ctx.backing, EXPORT_SIZE);
  const fills = [REGION.seqwrite, ...Array.from({ length: uncachedCases }, (_, k) => REGION.uncached(k))];
  if (ctx.total === 0 && !runDrainToo) throw new Error('nothing to run: no case matches --servers and --filter');
  log(`preparing the backing file: ${fills.reduce((a, r) => a + r.size, 0) / GiB} GiB of data`);
  for (const r of fills) await fillFile(ctx.backing, r.offset, r.size);
  await dropFileCache(ctx.backing);
  if (runDrainToo) {
    await sparseFile(ctx.drainSource, plan.drainBytes);
    await fillFile(ctx.drainSource, 0, plan.drainBytes);
  }

  const mainDefs: ServerDef[] = [
    nbdkitDef(ctx, 'memory', 'nbdkit memory', ['memory', String(EXPORT_SIZE)], true),
    nbdkitDef(ctx, 'file', 'nbdkit file', ['file', ctx.backing]),
    pcacheDef(ctx, 'pcache', 'pcache', 'cache.img'),
  ].filter((d) => opts.servers.has(d.id));
  await runSection(ctx, 'main', mainDefs, plan.main);

  const slowDefs: ServerDef[] = [
    nbdkitDef(ctx, 'slow', 'nbdkit delay (slow backing, direct)', slowArgs(ctx)),
    nbdkitDef(ctx, 'nbdkit-cache', 'nbdkit cache filter (writeback) -> delay', ['--filter=cache', '--filter=delay', 'file', ctx.backing, 'cache=writeback', ...SLOW_ARGS]),
    nbdkitDef(ctx, 'nbdkit-cache-4k', 'nbdkit cache filter (writeback, 4K blocks) -> delay', [
      '--filter=cache',
      '--filter=delay',
      'file',
      ctx.backing,
      'cache=writeback',
      'cache-min-block-size=4K',
      ...SLOW_ARGS,
    ]),
  ];
  if (opts.servers.has('pcache-slow') && plan.slow.length > 0) slowDefs.push(await slowPcacheDef(ctx));
  if (!interrupted) await runSection(ctx, 'slow', slowDefs.filter((d) => opts.servers.has(d.id)), plan.slow, true);

  if (runDrainToo && !interrupted) results.drain = await runDrain(ctx);
  if (interrupted) return 130;

  results.finishedAt = new Date().toISOString();
  results.machine.loadAtEnd = loadAverage();
  const md = renderMarkdown(results, { repo: REPO, mdPath: opts.md });
  mkdirSync(dirname(opts.md), { recursive: true });
  mkdirSync(dirname(opts.json), { recursive: true });
  // The sections from "In-process engine" on (bench/engine.ts, the profile analysis) are written by
  // hand from other tools; a rerun here keeps them.
  const ENGINE_HEADING = '\n## In-process engine';
  const old = existsSync(opts.md) ? readFileSync(opts.md, 'utf8') : '';
  const at = old.indexOf(ENGINE_HEADING);
  let text = at >= 0 ? md.trimEnd() + '\n' + old.slice(at) : md;
  // So is the --case section.
  const a = old.indexOf(SCENARIO_START);
  const b = old.indexOf(SCENARIO_END);
  if (a >= 0 && b > a) text = spliceScenarios(text, old.slice(a, b + SCENARIO_END.length) + '\n', ENGINE_HEADING);
  writeFileSync(opts.md, text);
  writeFileSync(opts.json, JSON.stringify(results, null, 2) + '\n');
  log('');
  for (const line of targetLines(results)) log(line);
  log(`\nwrote ${relative(process.cwd(), opts.md) || opts.md} and ${relative(process.cwd(), opts.json) || opts.json}`);
  return 0;
}

/** The --case run: the named cases, merged into the rows of earlier runs of the other cases. */
async function runCases(opts: Options, tmp: string, runDir: string): Promise<number> {
  const cases = opts.cases!;
  log(`pcache bench cases: ${cases.join(', ')}; files in ${tmp}`);
  const res = await runScenarios(
    { repo: REPO, tmp, runDir, cacheSize: opts.cacheSize, sustainSeconds: opts.sustainSeconds, runtime: opts.runtime, log },
    cases,
    loadAverage,
  );
  if (interrupted) return 130;
  const commit = (await run('git', ['-C', REPO, 'rev-parse', '--short', 'HEAD'])).stdout.trim() || 'unknown';
  for (const row of res.rows) row.run = `${res.startedAt.slice(0, 16).replace('T', ' ')}, ${commit}, ${res.loadAtStart.split(' ')[0]}`;
  const old: ScenarioResults | null = existsSync(opts.json) ? (JSON.parse(readFileSync(opts.json, 'utf8')) as ScenarioResults) : null;
  const merged: ScenarioResults = {
    ...res,
    rows: [...(old?.rows ?? []).filter((r) => !cases.includes(r.scenario)), ...res.rows].sort((x, y) => SCENARIOS.indexOf(x.scenario) - SCENARIOS.indexOf(y.scenario)),
    commands: { ...(old?.commands ?? {}), ...res.commands },
  };
  const block = renderScenarios(merged, process.argv.slice(2), commit);
  const md = existsSync(opts.md) ? readFileSync(opts.md, 'utf8') : '# pcache NBD benchmarks\n';
  mkdirSync(dirname(opts.md), { recursive: true });
  mkdirSync(dirname(opts.json), { recursive: true });
  writeFileSync(opts.md, spliceScenarios(md, block, '\n## In-process engine'));
  writeFileSync(opts.json, JSON.stringify(merged, null, 2) + '\n');
  log(`\nwrote ${relative(process.cwd(), opts.md) || opts.md} and ${relative(process.cwd(), opts.json) || opts.json}`);
  return 0;
}

main().then(
  (code) => {
    removeTemp();
    process.exitCode = code;
  },
  async (err: unknown) => {
    log(`bench: ${err instanceof Error ? err.message : String(err)}`);
    await endChildren();
    removeTemp();
    process.exitCode = 1;
  },
);
