/**
 * TLS for NBD (NBD_OPT_STARTTLS), in the forms nbdkit, qemu-nbd and libnbd use: pre-shared
 * keys from a file of `username:hexkey` lines (GnuTLS psktool's format), or X.509 from a
 * directory holding ca-cert.pem, server-cert.pem and server-key.pem (client-cert.pem and
 * client-key.pem on the client side). Only codecs and option building; the sockets are wrapped
 * by the server and the client.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';

export type TlsMode = 'off' | 'on' | 'require';

/**
 * PSK suites GnuTLS (libnbd, nbdkit, qemu) takes. With OpenSSL's PSK callbacks TLS 1.3 can
 * only use a SHA-256 suite, which GnuTLS 3.7 negotiates (checked with nbdinfo and nbdkit); the
 * TLS 1.2 PSK suites are kept for older peers.
 */
export const PSK_CIPHERS = [
  'TLS_AES_128_GCM_SHA256',
  'TLS_AES_256_GCM_SHA384',
  'TLS_CHACHA20_POLY1305_SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
].join(':');

export class TlsConfigError extends Error {
  override name = 'TlsConfigError';
}

/** Parses a PSK file: one `username:hexkey` per line; blank lines and `#` comments ignored. */
export function parsePskFile(text: string, source = 'PSK file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '' || line.startsWith('#')) continue;
    const colon = line.indexOf(':');
    const where = `${source} line ${i + 1}`;
    if (colon <= 0) throw new TlsConfigError(`${where}: expected username:hexkey`);
    const user = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) throw new TlsConfigError(`${where}: the key of '${user}' is not an even number of hex digits`);
    if (keys.has(user)) throw new TlsConfigError(`${where}: user '${user}' appears twice`);
    keys.set(user, Buffer.from(hex, 'hex'));
  }
  if (keys.size === 0) throw new TlsConfigError(`${source} holds no keys`);
  return keys;
}

export function readPskFile(file: string): Map<string, Buffer> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new TlsConfigError(`cannot read the PSK file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return parsePskFile(text, file);
}

function readPem(dir: string, name: string, required: boolean): Buffer | undefined {
  const file = path.join(dir, name);
  try {
    return fs.readFileSync(file);
  } catch (err) {
    if (!required && (err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new TlsConfigError(`cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** What the server needs to accept STARTTLS: keys or a certificate, and the policy. */
export interface ServerTls {
  mode: Exclude<TlsMode, 'off'>;
  /** Builds the options of one server-side TLSSocket. */
  socketOptions(): tls.TLSSocketOptions;
  describe: string;
}

export interface ServerTlsSettings {
  mode: TlsMode;
  pskFile?: string;
  certificatesDir?: string;
}

/** Loads keys or certificates once, at start-up, so a bad file is an error before listening. */
export function loadServerTls(s: ServerTlsSettings): ServerTls | null {
  if (s.mode === 'off') {
    if (s.pskFile || s.certificatesDir) throw new TlsConfigError('--tls-psk and --tls-certificates need --tls on or require');
    return null;
  }
  if (s.pskFile && s.certificatesDir) throw new TlsConfigError('--tls-psk and --tls-certificates exclude each other');
  if (s.pskFile) {
    const keys = readPskFile(s.pskFile);
    const context = tls.createSecureContext({ ciphers: PSK_CIPHERS });
    return {
      mode: s.mode,
      describe: `TLS ${s.mode} (PSK, ${keys.size} user${keys.size === 1 ? '' : 's'})`,
      socketOptions: () => ({
        isServer: true,
        secureContext: context,
        pskCallback: (_socket: tls.TLSSocket, identity: string) => keys.get(identity) ?? null,
      }),
    };
  }
  if (s.certificatesDir) {
    const dir = s.certificatesDir;
    const context = tls.createSecureContext({
      key: readPem(dir, 'server-key.pem', true),
      cert: readPem(dir, 'server-cert.pem', true),
      ca: readPem(dir, 'ca-cert.pem', false),
    });
    return {
      mode: s.mode,
      describe: `TLS ${s.mode} (X.509 from ${dir})`,
      socketOptions: () => ({ isServer: true, secureContext: context }),
    };
  }
  throw new TlsConfigError(`--tls ${s.mode} needs --tls-psk FILE or --tls-certificates DIR`);
}

/** The TLS half of an nbds:// URI, spelled as libnbd spells its query parameters. */
export interface ClientTlsSettings {
  pskFile?: string;
  /** PSK identity; libnbd's default is the local user name. */
  username?: string;
  certificatesDir?: string;
  /** Check the server's certificate against the CA and the host name (default true). */
  verifyPeer?: boolean;
}

/** Options for tls.connect over an already connected socket, after NBD_OPT_STARTTLS. */
export function clientTlsOptions(s: ClientTlsSettings, host: string | undefined): tls.ConnectionOptions {
  if (s.pskFile) {
    const keys = readPskFile(s.pskFile);
    const identity = s.username ?? os.userInfo().username;
    const key = keys.get(identity);
    if (!key) throw new TlsConfigError(`${s.pskFile} has no key for user '${identity}'`);
    return { ciphers: PSK_CIPHERS, checkServerIdentity: () => undefined, pskCallback: () => ({ identity, psk: key }) };
  }
  const opts: tls.ConnectionOptions = { rejectUnauthorized: s.verifyPeer !== false };
  if (host && !/^[\d.]+$|:/.test(host)) opts.servername = host;
  if (s.certificatesDir) {
    const dir = s.certificatesDir;
    const ca = readPem(dir, 'ca-cert.pem', s.verifyPeer !== false);
    if (ca) opts.ca = ca;
    const cert = readPem(dir, 'client-cert.pem', false);
    const key = readPem(dir, 'client-key.pem', false);
    if (cert && key) Object.assign(opts, { cert, key });
  }
  return opts;
}
