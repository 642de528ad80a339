/** The shared progress display, the stats --watch frame, serve's config loader and --version. */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { Progress } from '../../src/cli/progress.js';
import { configToArgv } from '../../src/cli/serve-config.js';
import { renderStatsFrame, type StatsSnapshot } from '../../src/cli/stats-watch.js';
import { CliError } from '../../src/cli/errors.js';
import { REPO_ROOT, runPcache, runPcacheInProcess } from '../helpers/cli.js';

const MiB = 2 ** 20;

function captured(): { io: { out(t: string): void; err(t: string): void }; err: () => string } {
  let err = '';
  return { io: { out: () => undefined, err: (t) => void (err += t) }, err: () => err };
}

test('progress: a redrawn bar with percent, bytes and rate on a terminal; throttled plain lines otherwise', () => {
  let now = 1_000_000;
  const tty = captured();
  const bar = new Progress(tty.io, { label: 'flush', total: 100 * MiB, tty: true, now: () => now });
  now += 2_000;
  bar.update(50 * MiB);
  now += 10; // within the redraw interval: skipped
  bar.update(60 * MiB);
  now += 1_990;
  bar.update(100 * MiB, { note: 'write-back failing: EIO' });
  bar.end();
  const frames = tty.err().split('\r').filter(Boolean);
  assert.equal(frames.length, 2, JSON.stringify(tty.err()));
  assert.equal(frames[0], '\x1b[K[###############...............]  50%  50.0 MiB of 100.0 MiB, 25.0 MiB/s, 2 s');
  assert.equal(frames[1], '\x1b[K[##############################] 100%  100.0 MiB of 100.0 MiB, 25.0 MiB/s, 4 s  (write-back failing: EIO)\n');

  const pipe = captured();
  const lines = new Progress(pipe.io, { label: 'writeback', total: null, tty: false, now: () => now });
  for (let i = 1; i <= 10; i++) {
    now += 500;
    lines.update(i * MiB, { detail: `${i} ksets` });
  }
  lines.update(11 * MiB, { force: true });
  lines.end();
  const out = pipe.err().split('\n').filter(Boolean);
  // every 2 s over 5 s, the first at once, and the forced last one
  assert.deepEqual(out, [
    'pcache: writeback: 1.0 MiB, 1 ksets, 2.0 MiB/s, 0 s',
    'pcache: writeback: 5.0 MiB, 5 ksets, 2.0 MiB/s, 2 s',
    'pcache: writeback: 9.0 MiB, 9 ksets, 2.0 MiB/s, 4 s',
    'pcache: writeback: 11.0 MiB, 2.2 MiB/s, 5 s',
  ]);
  assert.doesNotMatch(pipe.err(), /\r|\x1b/);

  const quick = captured();
  const q = new Progress(quick.io, { label: 'check', total: null, tty: false, quietForMs: 1_000, now: () => now });
  now += 300;
  q.update(5 * MiB);
  q.update(6 * MiB, { force: true });
  assert.equal(quick.err(), '', 'work quicker than quietForMs shows nothing');

  const silent = captured();
  new Progress(silent.io, { label: 'x', total: 1, quiet: true }).update(1, { force: true });
  assert.equal(silent.err(), '');
});

test('stats --watch frame: rates are differences over the interval; the first frame has none', () => {
  const a: StatsSnapshot = {
    dirtyBytes: 10 * MiB,
    nSegs: 31,
    segsUsed: 5,
    writebackError: null,
    counters: { readHits: 100, readMisses: 0, writtenBackBytes: 0, writebackErrors: 0, gcRuns: 1, segmentsFreed: 2, spaceWaits: 0 },
    nbd: { connectionsActive: 1, requests: { read: 100, write: 50, flush: 1 }, bytesRead: 100 * 4096, bytesWritten: 50 * 65536, errors: 0 },
    backing: { state: 'connected', lastError: null },
  };
  const b: StatsSnapshot = {
    ...a,
    dirtyBytes: 4 * MiB,
    segsUsed: 6,
    writebackLastError: 'EIO: WRITE offset=0',
    counters: { ...a.counters, readHits: 130, readMisses: 10, writtenBackBytes: 6 * MiB, writebackErrors: 1 },
    nbd: { ...a.nbd, requests: { read: 140, write: 250, flush: 3 }, bytesRead: 140 * 4096, bytesWritten: 250 * 65536 },
  };
  const first = renderStatsFrame('T', a, null, 0);
  assert.match(first, /^read\s+-\s+-\s+100$/m);
  assert.match(first, /^hit ratio\s+- now, 100\.0% since start$/m);
  const second = renderStatsFrame('T', b, a, 2);
  assert.match(second, /^read\s+20\s+0\.1\s+140$/m); // 40 reads of 4 KiB in 2 s
  assert.match(second, /^write\s+100\s+6\.3\s+250$/m); // 200 writes of 64 KiB in 2 s
  assert.match(second, /^flush\s+1\s+3$/m);
  assert.match(second, /^hit ratio\s+75\.0% now, 92\.9% since start$/m);
  assert.match(second, /^dirty\s+4\.0 MiB$/m);
  assert.match(second, /^write-back\s+3\.0 MiB\/s, 6\.0 MiB in all, 1 errors \(last: EIO: WRITE offset=0\)$/m);
  assert.match(second, /^segments\s+6 used of 31 \(19%\), 25 free$/m);
  assert.match(second, /^backing\s+connected$/m);
});

test('serve config files: devices, table words (count optional), options; errors name the line', () => {
  const names = ['listen', 'socket', 'export', 'metrics', 'log-level', 'log-format'];
  assert.deepEqual(configToArgv('cache-dev = /c\nbacking-dev=/b # the disk\n\n# comment\nmetrics = :9810\n', 'f', names), ['/c', '/b', '--metrics=:9810']);
  assert.deepEqual(configToArgv('cache-dev=/c\nbacking-dev=/b\ntable = data_crc true\n', 'f', names), ['/c', '/b', '2', 'data_crc', 'true']);
  assert.deepEqual(configToArgv('cache-dev=/c\nbacking-dev=/b\ntable = 2 cache_mode writeback\n', 'f', names), ['/c', '/b', '2', 'cache_mode', 'writeback']);
  const fails = (text: string, re: RegExp): void => assert.throws(() => configToArgv(text, 'x.conf', names), (e: unknown) => e instanceof CliError && re.test(e.message));
  fails('cache-dev=/c\n', /x\.conf: needs both cache-dev and backing-dev/);
  fails('cache-dev=/c\nbacking-dev=/b\nlisten\n', /x\.conf:3: expected 'key = value', not 'listen'/);
  fails('cache-dev=/c\ncache-dev=/d\n', /x\.conf:2: 'cache-dev' is given more than once/);
  fails('cache-dev=/c\nbacking-dev=/b\nconfig = /other\n', /x\.conf:3: unknown key 'config'/);
  fails('cache-dev=\n', /x\.conf:1: 'cache-dev' has no value/);
});

test('pcache --version prints the package version, from the source checkout and in-process alike', async () => {
  const { version } = JSON.parse(await readFile(join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string };
  const inProcess = await runPcacheInProcess(['--version']);
  assert.equal(inProcess.code, 0);
  assert.equal(inProcess.stdout, `pcache ${version}\n`);
  const child = await runPcache(['--version']);
  assert.equal(child.stdout, `pcache ${version}\n`);
});
