/**
 * Issue 13, findings 1, 2, 4 and 9 with the real `pcache` command: one owner per cache device
 * whatever the path or runtime directory, one cache per backing device, private sockets under
 * any umask, and one-line errors for a missing backing file and a foreign URI scheme.
 */
import assert from 'node:assert/strict';
import { linkSync, mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { controlSocketPath } from '../../src/cli/control.js';
import { runDir } from '../../src/media/lock.js';
import { REPO_ROOT, runPcache } from '../helpers/cli.js';
import { sparseFile, startServe, type ServeProc } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, run } from '../nbd/helpers.js';

const MiB = 1024 * 1024;

/** `pcache <args>` with its own environment (another runtime directory). */
function pcacheWithEnv(args: string[], env: NodeJS.ProcessEnv): ReturnType<typeof run> {
  return run(process.execPath, [join(REPO_ROOT, 'bin/pcache.js'), ...args], { env, timeoutMs: 60_000 });
}

async function qemuIo(uri: string, cmds: string[]): Promise<void> {
  const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri]);
  assert.equal(r.code, 0, `${cmds.join('; ')}: ${r.stderr}${r.stdout}`);
  assert.doesNotMatch(r.stdout, /Pattern verification failed|error/i, r.stdout);
}

test('a hard link and another runtime directory cannot start a second server; the flushed data survive', async (t) => {
  if (!(await haveTool('qemu-io'))) return t.skip('qemu-io is not installed');
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const link = join(dir, 'c2.img');
  linkSync(cache, link);
  const otherRun = join(dir, 'other-run');
  mkdirSync(otherRun);
  const elsewhere = { ...process.env, PCACHE_RUN_DIR: otherRun };

  let srv: ServeProc = await startServe(dir, cache, backing);
  try {
    // First start allocated the whole cache file: no holes for a full filesystem to find.
    assert.ok(statSync(cache).blocks * 512 >= 512 * MiB, 'cache file allocated');
    await qemuIo(srv.uri, ['write -P 0xa1 0 1M', 'write -P 0xa2 9M 64k', 'flush']);

    const attempts: Array<[string, string[]]> = [
      ['hard link, other runtime directory', ['serve', link, backing, '--socket', join(dir, 'b1.sock')]],
      ['same path, other runtime directory', ['serve', cache, backing, '--socket', join(dir, 'b2.sock')]],
      ['hard link, same runtime directory', ['serve', link, backing, '--socket', join(dir, 'b3.sock')]],
    ];
    for (const [what, args] of attempts) {
      const r = what.includes('other') ? await pcacheWithEnv(args, elsewhere) : await runPcache(args, { timeoutMs: 60_000 });
      assert.notEqual(r.code, 0, what);
      assert.match(r.stderr, new RegExp(`^pcache: cache device .*(c2|cache)\\.img is in use by another pcache \\(pid ${srv.proc.pid}: pcache serve `), `${what}: ${r.stderr}`);
    }
    // Offline tools on the device, under any name, are refused too while it is served.
    for (const args of [['check', link], ['dump', cache], ['writeback', link, backing], ['format', '--force', link]]) {
      const r = await pcacheWithEnv(args, elsewhere);
      assert.notEqual(r.code, 0, args.join(' '));
      assert.match(r.stderr, new RegExp(`is in use by another pcache \\(pid ${srv.proc.pid}`), `${args.join(' ')}: ${r.stderr}`);
    }
    // The hard link finds the running server's control socket: it is named after the inode.
    const st = await runPcache(['status', link]);
    assert.equal(st.code, 0, st.stderr);
    assert.match(st.stdout, /^0 131072 pcache /);
    // The first server still serves what it had.
    await qemuIo(srv.uri, ['read -P 0xa1 0 1M', 'read -P 0xa2 9M 64k']);
  } finally {
    assert.equal(await srv.stop(), 0);
  }
  // Restarted through the hard link: every flushed block is there, and the device checks clean.
  srv = await startServe(dir, link, backing);
  try {
    await qemuIo(srv.uri, ['read -P 0xa1 0 1M', 'read -P 0xa2 9M 64k']);
  } finally {
    assert.equal(await srv.stop(), 0);
  }
  const check = await runPcache(['check', cache]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  assert.match(check.stdout, /problems\s+none/);
});

test('two caches over one backing file: the second is refused, naming the first', async () => {
  const dir = await tempDir();
  const cacheA = await sparseFile(join(dir, 'a.img'), 512 * MiB);
  const cacheB = await sparseFile(join(dir, 'b.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const hard = join(dir, 'backing-2.img');
  linkSync(backing, hard);
  const srv = await startServe(dir, cacheA, backing, [], ['--sparse']);
  try {
    for (const b of [backing, hard]) {
      const r = await runPcache(['serve', cacheB, b, '--sparse', '--socket', join(dir, 'second.sock')]);
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, new RegExp(`^pcache: backing device ${b} is in use by another pcache \\(pid ${srv.proc.pid}: pcache serve ${cacheA} ${backing}`), r.stderr);
      // Refused before anything was written to the second cache device.
      assert.equal(statSync(cacheB).blocks, 0);
    }
  } finally {
    assert.equal(await srv.stop(), 0);
  }
  // Once the first has stopped, the second may have it.
  const second = await startServe(dir, cacheB, hard, [], ['--sparse']);
  assert.equal(await second.stop(), 0);
});

test('under umask 000 the sockets are owner-only; --socket-mode and --socket-group open them to a group', async () => {
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const old = process.umask(0);
  let srv: ServeProc;
  try {
    srv = await startServe(dir, cache, backing, [], ['--sparse']);
  } finally {
    process.umask(old);
  }
  try {
    const control = await controlSocketPath(cache);
    assert.equal(statSync(control).mode & 0o777, 0o600, 'control socket');
    assert.equal(statSync(srv.socket).mode & 0o777, 0o600, 'NBD socket');
    assert.equal(statSync(runDir()).mode & 0o777, 0o700, 'runtime directory');
  } finally {
    assert.equal(await srv.stop(), 0);
  }
  // Root may give the sockets to any group (1 is daemon on Debian); others to their own.
  const gid = process.getuid?.() === 0 ? 1 : process.getgid!();
  process.umask(0);
  try {
    srv = await startServe(dir, cache, backing, [], ['--socket-mode', '0660', '--socket-group', String(gid)]);
  } finally {
    process.umask(old);
  }
  try {
    for (const path of [await controlSocketPath(cache), srv.socket]) {
      const s = statSync(path);
      assert.equal(s.mode & 0o777, 0o660, path);
      assert.equal(s.gid, gid, path);
    }
    // The group may reach the sockets inside; others may not even list the directory.
    assert.equal(statSync(runDir()).mode & 0o777, 0o710);
  } finally {
    assert.equal(await srv.stop(), 0);
  }
  const bad = await runPcache(['serve', cache, backing, '--socket-mode', '0777x']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--socket-mode takes an octal mode such as 0660/);
  const weak = await runPcache(['serve', cache, backing, '--socket-mode', '0060']);
  assert.match(weak.stderr, /must let the owner read and write/);
});

test('a missing backing file and a foreign URI scheme get one clear line', async () => {
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const missing = join(dir, 'nope', 'backing.img');
  const cases: Array<[string[], string]> = [
    [['serve', cache, missing, '--sparse'], `pcache: backing device ${missing}: no such file\n`],
    [['serve', cache, 'http://x/', '--sparse'], "pcache: backing device http://x/: unsupported URI scheme 'http'"],
    [['serve', cache, 'file:///etc/x', '--sparse'], "pcache: backing device file:///etc/x: unsupported URI scheme 'file'"],
  ];
  for (const [args, want] of cases) {
    const r = await runPcache(args);
    assert.equal(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
    assert.ok(r.stderr.startsWith(want), `${args.join(' ')}: ${JSON.stringify(r.stderr)}`);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  }
});
