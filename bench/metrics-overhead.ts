/**
 * What `--metrics` costs on the I/O path (a latency histogram observation per request): fio's
 * nbd engine, 4 KiB random writes then 4 KiB random reads of them, against pcache without and
 * with --metrics (scraped once a second during the run, as Prometheus would, more often than
 * usual). Each run starts a fresh server on a fresh sparse cache device (empty cache), the same
 * backing file; the variants alternate, so load on the shared machine hits both alike.
 *
 * Then the CPU cost of one observation in this process, against a no-op observer in the same
 * loop: the part of the difference that is the metrics' own, free of the machine's load.
 *
 *   node --import tsx bench/metrics-overhead.ts [--rounds N] [--runtime S]
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { MemoryBacking } from '../src/backing/memory.js';
import { Cache } from '../src/cache/cache.js';
import { createMetrics } from '../src/cli/metrics.js';
import { MemoryMedium } from '../src/media/memory.js';
import type { NbdServerObserver } from '../src/nbd/server.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const ROUNDS = arg('rounds', 3);
const RUNTIME = arg('runtime', 8);
const PORT = 19_800 + Math.floor(Math.random() * 100);

const dir = mkdtempSync(join(tmpdir(), 'pcache-bench-metrics-'));
const env = { ...process.env, PCACHE_RUN_DIR: join(dir, 'run') };
const backing = join(dir, 'backing.img');
writeFileSync(backing, '');
truncateSync(backing, 1024 * 2 ** 20);

interface Result {
  writeIops: number;
  readIops: number;
}

async function once(withMetrics: boolean, n: number): Promise<Result> {
  const cache = join(dir, `cache-${n}.img`);
  writeFileSync(cache, '');
  truncateSync(cache, 1024 * 2 ** 20);
  const sock = join(dir, `nbd-${n}.sock`);
  const args = [join(ROOT, 'src/cli/main.ts'), 'serve', cache, backing, '--socket', sock, ...(withMetrics ? ['--metrics', `127.0.0.1:${PORT}`] : [])];
  const server = spawn(process.execPath, ['--import', 'tsx', ...args], { env, stdio: ['ignore', 'pipe', 'ignore'] });
  await new Promise<void>((resolve, reject) => {
    server.stdout!.on('data', (d: Buffer) => d.toString().includes(' pcache ') && resolve());
    server.on('exit', (code) => reject(new Error(`serve exited ${code}`)));
  });
  const fio = (rw: string): number => {
    const out = join(dir, `fio-${n}-${rw}.json`);
    const r = spawnSync('fio', [
      `--name=${rw}`, '--ioengine=nbd', `--uri=nbd+unix:///?socket=${sock}`, `--rw=${rw}`, '--bs=4096', '--iodepth=32', '--numjobs=1',
      '--offset=0', '--size=268435456', '--time_based', `--runtime=${RUNTIME}`, '--output-format=json', `--output=${out}`,
    ]);
    if (r.status !== 0) throw new Error(`fio ${rw}: ${r.stderr}`);
    const j = JSON.parse(readFileSync(out, 'utf8')) as { jobs: Array<{ read: { iops: number }; write: { iops: number } }> };
    return rw === 'randwrite' ? j.jobs[0]!.write.iops : j.jobs[0]!.read.iops;
  };
  // fio runs synchronously here (this process waits), so a child does the scraping.
  const scraper = withMetrics
    ? spawn('sh', ['-c', `while :; do curl -s -o /dev/null http://127.0.0.1:${PORT}/metrics; sleep 1; done`], { stdio: 'ignore' })
    : null;
  const writeIops = fio('randwrite');
  const readIops = fio('randread');
  scraper?.kill('SIGKILL');
  server.kill('SIGTERM');
  await new Promise((r) => server.on('exit', r));
  rmSync(cache, { force: true });
  return { writeIops, readIops };
}

const load0 = loadavg();
const results: Record<'without' | 'with', Result[]> = { without: [], with: [] };
let n = 0;
for (let round = 0; round < ROUNDS; round++) {
  for (const variant of round % 2 === 0 ? (['without', 'with'] as const) : (['with', 'without'] as const)) {
    results[variant].push(await once(variant === 'with', n++));
  }
}
const load1 = loadavg();
rmSync(dir, { recursive: true, force: true });
const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
const w0 = mean(results.without.map((r) => r.writeIops));
const w1 = mean(results.with.map((r) => r.writeIops));
const r0 = mean(results.without.map((r) => r.readIops));
const r1 = mean(results.with.map((r) => r.readIops));
console.log(`${new Date().toISOString()}, ${ROUNDS} rounds of ${RUNTIME} s per case, alternating; ${cpus().length} cores, load ${load0.map((l) => l.toFixed(2)).join(' ')} at the start, ${load1.map((l) => l.toFixed(2)).join(' ')} at the end\n`);
console.log('| fio nbd, 4 KiB, qd32, 1 job (empty cache at the start) | without --metrics IOPS | with --metrics IOPS | with ÷ without |');
console.log('|---|---:|---:|---:|');
console.log(`| random write | ${w0.toFixed(0)} | ${w1.toFixed(0)} | ${(w1 / w0).toFixed(2)}x |`);
console.log(`| random read of what was written (hits) | ${r0.toFixed(0)} | ${r1.toFixed(0)} | ${(r1 / r0).toFixed(2)}x |`);
console.log(`\nper round (write/read IOPS): without ${results.without.map((r) => `${r.writeIops.toFixed(0)}/${r.readIops.toFixed(0)}`).join(', ')}; with ${results.with.map((r) => `${r.writeIops.toFixed(0)}/${r.readIops.toFixed(0)}`).join(', ')}`);

// The cost per request in CPU: the server calls requestDone once per request, after reading the
// clock. Same loop, a no-op observer as the reference.
const medium = new MemoryMedium(512 * 2 ** 20);
const cache = await Cache.open(medium, new MemoryBacking(64 * 2 ** 20));
const metrics = createMetrics({ cacheStatus: () => cache.status(), nbdStats: () => null, backing: new MemoryBacking(1) });
const noop: NbdServerObserver = { requestDone: () => undefined };
const CALLS = 1_000_000;
const perCall = (o: NbdServerObserver): number => {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < CALLS; i++) {
    const started = process.hrtime.bigint();
    o.requestDone!(i & 1 ? 'READ' : 'WRITE', 4096, Number(process.hrtime.bigint() - started) / 1e9);
  }
  return Number(process.hrtime.bigint() - t0) / CALLS;
};
perCall(noop);
perCall(metrics.observer);
const ns = { noop: [] as number[], metrics: [] as number[] };
for (let i = 0; i < 5; i++) {
  ns.noop.push(perCall(noop));
  ns.metrics.push(perCall(metrics.observer));
}
const best = (xs: number[]): number => Math.min(...xs);
console.log(`\n| per request, ${CALLS.toLocaleString('en')} calls, best of 5 | ns |`);
console.log('|---|---:|');
console.log(`| no-op observer (clock reads only) | ${best(ns.noop).toFixed(0)} |`);
console.log(`| --metrics observer (clock reads + histogram and counters) | ${best(ns.metrics).toFixed(0)} |`);
console.log(`| _metrics' own cost per request_ | ${(best(ns.metrics) - best(ns.noop)).toFixed(0)} |`);
metrics.close();
await cache.close();
