/**
 * `pcache serve --metrics`: Prometheus text scraped after real NBD traffic (libnbd), and
 * `pcache stats --watch` redrawing its table from the same server.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { REPO_ROOT, runPcache } from '../helpers/cli.js';
import { sparseFile, startServe, type ServeProc } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { havePythonNbd, runPython } from '../nbd/helpers.js';

const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The metrics address from the start log line (the server was given port 0). */
async function metricsUrl(srv: ServeProc): Promise<string> {
  for (let i = 0; i < 200; i++) {
    const m = /metrics=(http:\/\/\S+\/metrics)/.exec(srv.stderr());
    if (m) return m[1]!;
    await sleep(25);
  }
  throw new Error(`no metrics address in the start line: ${srv.stderr()}`);
}

async function scrape(url: string): Promise<{ text: string; value(name: string, labels?: string): number }> {
  const res = await fetch(url);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  const text = await res.text();
  return {
    text,
    value(name, labels) {
      const key = labels ? `${name}{${labels}}` : name;
      const line = text.split('\n').find((l) => l.startsWith(`${key} `));
      assert.ok(line, `${key} is in the scrape`);
      return Number(line.slice(key.length + 1));
    },
  };
}

async function serveWithMetrics(t: TestContext): Promise<{ srv: ServeProc; cache: string; url: string } | null> {
  if (!(await havePythonNbd())) {
    t.skip('python3-libnbd is not installed');
    return null;
  }
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const srv = await startServe(dir, cache, backing, [], ['--metrics', '127.0.0.1:0']);
  t.after(() => srv.stop().catch(() => srv.kill()));
  return { srv, cache, url: await metricsUrl(srv) };
}

test('/metrics after real traffic: counters match what was sent, the latency histogram has buckets, gauges move after a flush', async (t) => {
  const s = await serveWithMetrics(t);
  if (!s) return;
  const before = await scrape(s.url);
  assert.equal(before.value('pcache_nbd_requests_total', 'op="write"'), 0);
  assert.equal(before.value('pcache_dirty_bytes'), 0);
  assert.equal(before.value('pcache_segments_free') + before.value('pcache_segments_used'), before.value('pcache_segments'));

  // 7 writes of 64 KiB and 1 of 4 KiB; 3 reads of the written data and 2 of never-written data
  // (misses); 1 flush, on one connection.
  const py = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(7):
    h.pwrite(bytes([i + 1]) * 65536, i * 65536)
h.pwrite(b"x" * 4096, 8 * 1048576)
for i in range(3):
    assert h.pread(65536, i * 65536) == bytes([i + 1]) * 65536
h.pread(4096, 32 * 1048576)
h.pread(4096, 40 * 1048576)
h.flush()
h.shutdown()
`;
  const r = await runPython(py, [s.srv.uri]);
  assert.equal(r.code, 0, r.stderr);

  const after = await scrape(s.url);
  assert.equal(after.value('pcache_nbd_requests_total', 'op="write"'), 8);
  assert.equal(after.value('pcache_nbd_request_bytes_total', 'op="write"'), 7 * 65536 + 4096);
  assert.equal(after.value('pcache_nbd_requests_total', 'op="read"'), 5);
  assert.equal(after.value('pcache_nbd_request_bytes_total', 'op="read"'), 3 * 65536 + 2 * 4096);
  assert.equal(after.value('pcache_nbd_requests_total', 'op="flush"'), 1);
  assert.equal(after.value('pcache_read_hits_total'), 3);
  assert.equal(after.value('pcache_read_misses_total'), 2);
  assert.equal(after.value('pcache_read_hit_ratio'), 3 / 5);
  assert.equal(after.value('pcache_nbd_connections_total'), 1);
  assert.equal(after.value('pcache_nbd_connections'), 0);
  assert.equal(after.value('pcache_backing_up'), 1);

  // The histogram: cumulative buckets up to +Inf, whose count is every write.
  const buckets = [...after.text.matchAll(/^pcache_nbd_request_duration_seconds_bucket\{le="([^"]+)",op="write"\} (\d+)$/gm)].map((m) => ({ le: m[1]!, n: Number(m[2]) }));
  assert.ok(buckets.length >= 10, `write latency buckets: ${buckets.length}`);
  assert.equal(buckets.at(-1)!.le, '+Inf');
  assert.equal(buckets.at(-1)!.n, 8);
  for (let i = 1; i < buckets.length; i++) assert.ok(buckets[i]!.n >= buckets[i - 1]!.n, 'buckets are cumulative');
  assert.equal(after.value('pcache_nbd_request_duration_seconds_count', 'op="write"'), 8);
  assert.ok(after.value('pcache_nbd_request_duration_seconds_sum', 'op="write"') > 0);
  assert.match(after.text, /^# TYPE pcache_nbd_request_duration_seconds histogram$/m);
  assert.match(after.text, /^# TYPE pcache_writeback_bytes_total counter$/m);

  // Gauges before and after pcache flush: dirty bytes go to zero, written-back bytes grow.
  const dirty = after.value('pcache_dirty_bytes');
  const writtenBack = after.value('pcache_writeback_bytes_total');
  assert.ok(dirty > 0 || writtenBack > 0, 'the writes are dirty or already written back');
  const fl = await runPcache(['flush', s.cache]);
  assert.equal(fl.code, 0, fl.stderr);
  const flushed = await scrape(s.url);
  assert.equal(flushed.value('pcache_dirty_bytes'), 0);
  assert.ok(flushed.value('pcache_writeback_bytes_total') >= 7 * 65536 + 4096, 'everything written was written back');
  assert.ok(flushed.value('pcache_writeback_ksets_total') > 0);
  assert.equal(flushed.value('pcache_writeback_errors_total'), 0);

  const missing = await fetch(s.url.replace(/\/metrics$/, '/nope'));
  assert.equal(missing.status, 404);

  // The sample Grafana dashboard asks only for metrics the server has.
  const dashboard = await readFile(join(REPO_ROOT, 'contrib/grafana-dashboard.json'), 'utf8');
  const used = new Set([...dashboard.matchAll(/\bpcache_[a-z_]+/g)].map((m) => m[0]));
  assert.ok(used.size >= 10);
  for (const name of used) assert.match(flushed.text, new RegExp(`^${name}[{ ]`, 'm'), `${name} (used by the dashboard) is served`);
});

test('stats --watch renders frames with rates until --count, and until SIGINT without it', async (t) => {
  const s = await serveWithMetrics(t);
  if (!s) return;
  const r = await runPcache(['stats', s.cache, '--watch', '0.2', '--count', '3']);
  assert.equal(r.code, 0, r.stderr);
  const frames = r.stdout.split(/\n\n/).filter((f) => f.startsWith('pcache stats '));
  assert.equal(frames.length, 3, r.stdout);
  for (const f of frames) {
    assert.match(f, /^write\s+\S+\s+\S+\s+\d+$/m);
    assert.match(f, /^hit ratio /m);
    assert.match(f, /^segments\s+\d+ used of \d+/m);
  }
  assert.match(frames[0]!, /^read\s+-\s+-\s+0$/m, 'the first frame has no rates yet');
  assert.match(frames[1]!, /^read\s+0\s+0\.0\s+0$/m, 'later frames have rates');

  // Without --count it runs until interrupted, and SIGINT ends it cleanly.
  const child = spawn(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'stats', s.cache, '--watch', '0.2'], {
    cwd: REPO_ROOT,
    env: process.env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const deadline = Date.now() + 30_000;
  while ((out.match(/^pcache stats /gm) ?? []).length < 2) {
    assert.ok(Date.now() < deadline, `two frames within 30 s: ${out}`);
    await sleep(50);
  }
  child.kill('SIGINT');
  assert.equal(await exited, 0);
});
