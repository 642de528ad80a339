/**
 * CLI start-up: `pcache status <cache-dev>` against one running server, run from the TypeScript
 * source through tsx (how bin/pcache.js ran every command before the packaged release, and still
 * runs in a source checkout) and from the compiled dist/ with plain node (how the installed
 * package runs). Both do the same work: start, connect to the control socket, print one line.
 * Runs alternate, so machine load hits both alike.
 *
 *   node --import tsx bench/startup.ts [--runs N]
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const runsArg = process.argv.indexOf('--runs');
const RUNS = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 30;

const dir = mkdtempSync(join(tmpdir(), 'pcache-bench-startup-'));
const env = { ...process.env, PCACHE_RUN_DIR: join(dir, 'run') };
const cache = join(dir, 'cache.img');
const backing = join(dir, 'backing.img');
writeFileSync(cache, '');
truncateSync(cache, 512 * 2 ** 20);
writeFileSync(backing, '');
truncateSync(backing, 64 * 2 ** 20);

if (!existsSync(join(ROOT, 'dist/cli/main.js')) || process.argv.includes('--build')) {
  const b = spawnSync('npm', ['run', 'build'], { cwd: ROOT, stdio: 'inherit' });
  if (b.status !== 0) throw new Error('npm run build failed');
}

const server = spawn(process.execPath, [join(ROOT, 'dist/cli/main.js'), 'serve', cache, backing, '--socket', join(dir, 'nbd.sock')], { env, stdio: ['ignore', 'pipe', 'ignore'] });
await new Promise<void>((resolve, reject) => {
  server.stdout!.on('data', (d: Buffer) => d.toString().includes(' pcache ') && resolve());
  server.on('exit', (code) => reject(new Error(`serve exited ${code}`)));
});

const variants = {
  'source through tsx (before)': [join(ROOT, 'bin/pcache.js'), 'status', cache],
  'compiled dist/, plain node (after)': [join(ROOT, 'dist/cli/main.js'), 'status', cache],
} as const;
type Name = keyof typeof variants;
const times: Record<Name, number[]> = { 'source through tsx (before)': [], 'compiled dist/, plain node (after)': [] };

const loadBefore = loadavg();
for (let i = 0; i < RUNS + 1; i++) {
  for (const name of Object.keys(variants) as Name[]) {
    const t0 = process.hrtime.bigint();
    const r = spawnSync(process.execPath, variants[name], { env, encoding: 'utf8' });
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    if (r.status !== 0 || !r.stdout.includes(' pcache ')) throw new Error(`${name}: ${r.stderr}`);
    if (i > 0) times[name].push(ms); // the first round warms the page cache
  }
}
const loadAfter = loadavg();
server.kill('SIGTERM');
await new Promise((r) => server.on('exit', r));
rmSync(dir, { recursive: true, force: true });

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
const [before, after] = Object.values(times);
console.log(`${new Date().toISOString()}, ${RUNS} runs each, alternating; ${cpus().length} cores, load ${loadBefore.map((l) => l.toFixed(2)).join(' ')} at the start, ${loadAfter.map((l) => l.toFixed(2)).join(' ')} at the end; Node ${process.version}\n`);
console.log('| `pcache status <cache-dev>` | median ms | mean ms | min ms |');
console.log('|---|---:|---:|---:|');
for (const [name, xs] of Object.entries(times)) console.log(`| ${name} | ${median(xs).toFixed(0)} | ${mean(xs).toFixed(0)} | ${Math.min(...xs).toFixed(0)} |`);
console.log(`| _after ÷ before_ | ${(median(after!) / median(before!)).toFixed(2)}x | ${(mean(after!) / mean(before!)).toFixed(2)}x | |`);
