/**
 * Opens a backing device from what the user wrote: an NBD URI (`nbd://host[:port]/export`,
 * `nbd+unix:///export?socket=/path`, their TLS forms nbds:// and nbds+unix:// with libnbd's
 * tls-psk-file, tls-username and tls-certificates parameters) or a file or block device path.
 */
import type { BackingDevice } from './backing.js';
import { openFileBacking, type FileBackingOptions } from './file.js';
import { openNbdBacking, type NbdBackingOptions } from './nbd.js';

export interface OpenBackingOptions {
  /** For a path: create a sparse file when missing (FileBackingOptions). */
  file?: FileBackingOptions;
  /** For a URI: connections, timeouts, the event log. */
  nbd?: NbdBackingOptions;
}

/**
 * Does `spec` name an NBD export rather than a path? Every nbd scheme (nbds:// and nbds+unix://
 * with TLS included) goes to nbd.ts, which says which of them it speaks.
 */
export function isNbdUri(spec: string): boolean {
  return /^nbds?(\+[a-z]+)?:\/\//i.test(spec);
}

/** The scheme of a URI that is not an NBD one (http://x/ -> 'http'), or null for a path. */
export function foreignScheme(spec: string): string | null {
  const m = /^([a-z][a-z0-9+.-]*):\/\//i.exec(spec);
  return m && !isNbdUri(spec) ? m[1]! : null;
}

export function openBacking(spec: string, opts: OpenBackingOptions = {}): Promise<BackingDevice> {
  if (isNbdUri(spec)) return openNbdBacking(spec, opts.nbd);
  const scheme = foreignScheme(spec);
  if (scheme !== null) {
    // Taken as a path, http://x/ would give a puzzling "no such file" for a directory "http:".
    return Promise.reject(
      Object.assign(
        new Error(`backing device ${spec}: unsupported URI scheme '${scheme}' (pcache speaks nbd://, nbd+unix:// and nbds:// URIs; anything else is a file or block device path)`),
        { code: 'EPROTONOSUPPORT' },
      ),
    );
  }
  return openFileBacking(spec, opts.file);
}
