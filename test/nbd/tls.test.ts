/**
 * NBD over TLS in both directions: our server against libnbd (nbdinfo, nbdcopy) and qemu-img
 * with pre-shared keys and X.509; our client against nbdkit --tls=require; and the option
 * haggling rules of --tls require seen byte by byte.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { connectNbd, listNbdExports } from '../../src/nbd/client.js';
import * as P from '../../src/nbd/protocol.js';
import { loadServerTls, parsePskFile, TlsConfigError, type TlsMode } from '../../src/nbd/tls.js';
import { startNbdkit } from '../helpers/nbd-servers.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, needTools, RawConn, run, startServer } from './helpers.js';
import { makeCertificates, makePskFile } from './tls-fixtures.js';

const MiB = 1024 * 1024;

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

test('PSK files: nbdkit format parsed, bad lines named by line number', () => {
  const keys = parsePskFile('# comment\nalice:00ff10\n\nbob:ABCD\n');
  assert.deepEqual([...keys.keys()], ['alice', 'bob']);
  assert.ok(keys.get('alice')!.equals(Buffer.from([0, 0xff, 0x10])));
  assert.throws(() => parsePskFile('alice\n'), /line 1: expected username:hexkey/);
  assert.throws(() => parsePskFile('alice:xyz\n'), /line 1: the key of 'alice' is not an even number of hex digits/);
  assert.throws(() => parsePskFile('a:00\na:11\n'), /line 2: user 'a' appears twice/);
  assert.throws(() => parsePskFile('\n# nothing\n'), /holds no keys/);
  assert.throws(() => loadServerTls({ mode: 'require' }), TlsConfigError);
  assert.throws(() => loadServerTls({ mode: 'on', pskFile: '/nonexistent/keys.psk' }), /cannot read the PSK file \/nonexistent\/keys.psk: ENOENT/);
  assert.throws(() => loadServerTls({ mode: 'off', pskFile: '/x' }), /need --tls on or require/);
  assert.equal(loadServerTls({ mode: 'off' }), null);
});

async function pskServer(dir: string, mode: TlsMode = 'require') {
  const { file } = makePskFile(dir, ['alice', 'bob']);
  const srv = await startServer(64 * MiB, { tls: loadServerTls({ mode, pskFile: file }) });
  const base = `nbds://alice@127.0.0.1:${srv.port}/`;
  return { srv, file, uri: `${base}?tls-psk-file=${file}` };
}

test('--tls require with PSK: nbdinfo and nbdcopy over TLS, clear text and a wrong key refused', async (t) => {
  if (!(await needTools(t, 'nbdinfo', 'nbdcopy'))) return;
  const dir = await tempDir();
  const { srv, uri } = await pskServer(dir);
  try {
    const info = await run('nbdinfo', ['--json', uri]);
    assert.equal(info.code, 0, info.stderr);
    const exp = JSON.parse(info.stdout).exports[0];
    assert.equal(exp['export-size'], 64 * MiB);
    assert.equal(srv.server.stats().tlsConnections, 1);

    const data = randomBytes(16 * MiB);
    const src = path.join(dir, 'src.img');
    const back = path.join(dir, 'back.img');
    fs.writeFileSync(src, data);
    const up = await run('nbdcopy', [src, uri], { timeoutMs: 60_000 });
    assert.equal(up.code, 0, up.stderr);
    assert.equal(sha(srv.device.data.subarray(0, 16 * MiB)), sha(data), 'what nbdcopy wrote over TLS reached the device');
    const down = await run('nbdcopy', [uri, back], { timeoutMs: 60_000 });
    assert.equal(down.code, 0, down.stderr);
    assert.equal(sha(fs.readFileSync(back).subarray(0, 16 * MiB)), sha(data));

    // Clear text: libnbd's GO gets NBD_REP_ERR_TLS_REQD and no data flows.
    const plain = await run('nbdinfo', [`nbd://127.0.0.1:${srv.port}/`]);
    assert.notEqual(plain.code, 0);
    // A key the server does not hold: the TLS handshake fails.
    const other = makePskFile(path.join(dir, 'other'), ['alice']);
    const wrong = await run('nbdinfo', [`nbds://alice@127.0.0.1:${srv.port}/?tls-psk-file=${other.file}`]);
    assert.notEqual(wrong.code, 0);
    assert.match(wrong.stderr, /TLS|handshake|tls/i);
    // An unknown user is refused the same way.
    const mallory = makePskFile(path.join(dir, 'mallory'), ['mallory']);
    const unknown = await run('nbdinfo', [`nbds://mallory@127.0.0.1:${srv.port}/?tls-psk-file=${mallory.file}`]);
    assert.notEqual(unknown.code, 0);
    assert.ok(srv.logs.some((l) => /TLS handshake failed/.test(l)), srv.logs.join('\n'));
  } finally {
    await srv.close();
  }
});

test('--tls require: options before STARTTLS get NBD_REP_ERR_TLS_REQD, EXPORT_NAME is hung up on', async () => {
  const dir = await tempDir();
  const { srv } = await pskServer(dir);
  try {
    const c = await RawConn.connect(srv.port);
    await c.read(P.HANDSHAKE_GREETING_SIZE);
    c.write(P.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
    for (const opt of [P.NBD_OPT_LIST, P.NBD_OPT_STRUCTURED_REPLY, P.NBD_OPT_GO, P.NBD_OPT_INFO]) {
      const data = opt === P.NBD_OPT_GO || opt === P.NBD_OPT_INFO ? P.encodeInfoRequest('', []) : undefined;
      c.write(P.encodeOption(opt, data));
      const h = P.decodeOptionReplyHeader(await c.read(P.OPTION_REPLY_HEADER_SIZE));
      assert.equal(h.option, opt);
      assert.equal(h.type, P.NBD_REP_ERR_TLS_REQD, `option ${P.optionName(opt)}`);
      await c.read(h.length);
    }
    // STARTTLS with data is invalid, and the connection goes on.
    c.write(P.encodeOption(P.NBD_OPT_STARTTLS, Buffer.from('x')));
    const bad = P.decodeOptionReplyHeader(await c.read(P.OPTION_REPLY_HEADER_SIZE));
    assert.equal(bad.type, P.NBD_REP_ERR_INVALID);
    await c.read(bad.length);
    c.write(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.alloc(0)));
    assert.ok(await c.waitClosed(), 'EXPORT_NAME without TLS ends the session');
    c.destroy();
  } finally {
    await srv.close();
  }
  // Without TLS configured, STARTTLS is simply unsupported.
  const plain = await startServer(MiB);
  try {
    const c = await RawConn.connect(plain.port);
    await c.read(P.HANDSHAKE_GREETING_SIZE);
    c.write(P.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));
    c.write(P.encodeOption(P.NBD_OPT_STARTTLS));
    const h = P.decodeOptionReplyHeader(await c.read(P.OPTION_REPLY_HEADER_SIZE));
    assert.equal(h.type, P.NBD_REP_ERR_UNSUP);
    c.destroy();
  } finally {
    await plain.close();
  }
});

test('--tls on: clear-text and TLS clients are both served; our own client speaks both', async (t) => {
  if (!(await needTools(t, 'nbdinfo'))) return;
  const dir = await tempDir();
  const { srv, file, uri } = await pskServer(dir, 'on');
  try {
    for (const u of [uri, `nbd://127.0.0.1:${srv.port}/`]) {
      const r = await run('nbdinfo', [u]);
      assert.equal(r.code, 0, r.stderr);
    }
    const secure = await connectNbd(`nbds://127.0.0.1:${srv.port}/?tls-psk-file=${file}&tls-username=bob`);
    await secure.write(4096, Buffer.alloc(4096, 0x5a));
    await secure.flush();
    assert.ok((await secure.read(4096, 4096)).equals(Buffer.alloc(4096, 0x5a)));
    assert.ok(secure.structuredReplies, 'structured replies negotiated after STARTTLS');
    await secure.disconnect();
    assert.equal(srv.server.stats().tlsConnections, 2);
    assert.deepEqual(await listNbdExports(`nbds://127.0.0.1:${srv.port}/?tls-psk-file=${file}&tls-username=alice`), [{ name: '', description: '' }]);
  } finally {
    await srv.close();
  }
});

test('X.509: nbdinfo, qemu-img and our client verify the server certificate', async (t) => {
  if (!(await needTools(t, 'openssl', 'nbdinfo'))) return;
  const dir = await tempDir();
  const pki = await makeCertificates(path.join(dir, 'pki'));
  const srv = await startServer(32 * MiB, { tls: loadServerTls({ mode: 'require', certificatesDir: pki }) });
  try {
    for (const host of ['localhost', '127.0.0.1']) {
      const r = await run('nbdinfo', [`nbds://${host}:${srv.port}/?tls-certificates=${pki}`]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /with TLS/);
    }
    // Another CA: libnbd refuses the certificate.
    const other = await makeCertificates(path.join(dir, 'other'));
    const bad = await run('nbdinfo', [`nbds://localhost:${srv.port}/?tls-certificates=${other}`]);
    assert.notEqual(bad.code, 0);

    const c = await connectNbd(`nbds://localhost:${srv.port}/?tls-certificates=${pki}`);
    await c.write(0, Buffer.alloc(65536, 7));
    await c.disconnect();
    assert.ok(srv.device.data.subarray(0, 65536).equals(Buffer.alloc(65536, 7)));
    await assert.rejects(connectNbd(`nbds://localhost:${srv.port}/?tls-certificates=${other}`), /TLS handshake with the NBD server failed/);
    await assert.rejects(connectNbd(`nbd://localhost:${srv.port}/`), /NBD_REP_ERR_TLS_REQD/);

    if (await haveTool('qemu-img')) {
      const obj = `tls-creds-x509,id=tls0,dir=${pki},endpoint=client`;
      const q = await run('qemu-img', ['info', '--output=json', '--object', obj, '--image-opts', `driver=nbd,host=localhost,port=${srv.port},tls-creds=tls0`]);
      assert.equal(q.code, 0, q.stderr);
      assert.equal(JSON.parse(q.stdout)['virtual-size'], 32 * MiB);
    }
  } finally {
    await srv.close();
  }
});

test('qemu-img convert over TLS-PSK (tls-creds-psk) writes what it reads back', async (t) => {
  if (!(await needTools(t, 'qemu-img'))) return;
  const dir = await tempDir();
  const { srv } = await pskServer(dir);
  try {
    const data = randomBytes(4 * MiB);
    const src = path.join(dir, 'src.raw');
    fs.writeFileSync(src, data);
    const obj = `tls-creds-psk,id=tls0,dir=${dir},username=bob,endpoint=client`;
    const target = `driver=nbd,host=127.0.0.1,port=${srv.port},tls-creds=tls0`;
    const w = await run('qemu-img', ['convert', '-n', '-f', 'raw', '--object', obj, '--target-image-opts', src, target], { timeoutMs: 60_000 });
    assert.equal(w.code, 0, w.stderr);
    assert.ok(srv.device.data.subarray(0, 4 * MiB).equals(data));
    const q = await run('qemu-img', ['info', '--output=json', '--object', obj, '--image-opts', target]);
    assert.equal(q.code, 0, q.stderr);
  } finally {
    await srv.close();
  }
});

test('our client against nbdkit --tls=require, with PSK and with certificates', async (t) => {
  if (!(await needTools(t, 'nbdkit', 'openssl'))) return;
  const dir = await tempDir();
  const { file } = makePskFile(path.join(dir, 'psk'), ['carol']);
  const kit = await startNbdkit(dir, ['--tls=require', `--tls-psk=${file}`, 'memory', '16M'], 'kit-psk');
  try {
    const uri = `nbds+unix:///?socket=${kit.sock}&tls-psk-file=${file}&tls-username=carol`;
    const c = await connectNbd(uri);
    const data = randomBytes(MiB);
    await c.write(MiB, data);
    await c.flush();
    assert.ok((await c.read(MiB, MiB)).equals(data));
    await c.disconnect();
    await assert.rejects(connectNbd(kit.uri), /NBD_REP_ERR_TLS_REQD|TLS/);
    await assert.rejects(connectNbd(`nbds+unix:///?socket=${kit.sock}&tls-psk-file=${file}&tls-username=dave`), /no key for user 'dave'/);
  } finally {
    await kit.stop();
  }
  const pki = await makeCertificates(path.join(dir, 'pki'));
  const kit2 = await startNbdkit(dir, ['--tls=require', `--tls-certificates=${pki}`, 'memory', '16M'], 'kit-x509');
  try {
    // Over a unix socket the name checked is localhost, as libnbd does.
    const c = await connectNbd(`nbds+unix:///?socket=${kit2.sock}&tls-certificates=${pki}`);
    await c.write(0, Buffer.alloc(4096, 9));
    assert.ok((await c.read(0, 4096)).equals(Buffer.alloc(4096, 9)));
    await c.disconnect();
  } finally {
    await kit2.stop();
  }
});
