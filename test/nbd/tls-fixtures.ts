/**
 * Keys and certificates made at test time: a PSK file in nbdkit's (psktool's) format, and a CA
 * with a server certificate for localhost and 127.0.0.1, made with openssl, laid out as nbdkit,
 * qemu and libnbd expect (ca-cert.pem, server-cert.pem, server-key.pem).
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { run } from './helpers.js';

/** Writes DIR/keys.psk (the name qemu's tls-creds-psk looks for) with one line per user. */
export function makePskFile(dir: string, users: string[]): { file: string; keys: Map<string, string> } {
  mkdirSync(dir, { recursive: true });
  const keys = new Map(users.map((u) => [u, randomBytes(32).toString('hex')] as const));
  const file = join(dir, 'keys.psk');
  writeFileSync(file, [...keys].map(([u, k]) => `${u}:${k}\n`).join(''), { mode: 0o600 });
  return { file, keys };
}

async function openssl(args: string[]): Promise<void> {
  const r = await run('openssl', args);
  if (r.code !== 0) throw new Error(`openssl ${args[0]} failed: ${r.stderr}`);
}

/** A fresh CA and a server certificate signed by it, in `dir`. */
export async function makeCertificates(dir: string): Promise<string> {
  mkdirSync(dir, { recursive: true });
  const p = (f: string): string => join(dir, f);
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  await openssl(['req', '-x509', ...ec, '-keyout', p('ca-key.pem'), '-out', p('ca-cert.pem'), '-days', '2', '-subj', '/CN=pcache test CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  await openssl(['req', ...ec, '-keyout', p('server-key.pem'), '-out', p('server.csr'), '-subj', '/CN=localhost']);
  writeFileSync(p('server.ext'), [
    'subjectAltName=DNS:localhost,IP:127.0.0.1',
    'basicConstraints=CA:FALSE',
    'keyUsage=critical,digitalSignature,keyEncipherment',
    'extendedKeyUsage=serverAuth',
    '',
  ].join('\n'));
  await openssl(['x509', '-req', '-in', p('server.csr'), '-CA', p('ca-cert.pem'), '-CAkey', p('ca-key.pem'), '-CAcreateserial',
    '-out', p('server-cert.pem'), '-days', '2', '-extfile', p('server.ext')]);
  return dir;
}
