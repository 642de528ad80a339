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

/** Does `spec` name an NBD export rather than a path? (`nbds://` and `nbds+unix://` use TLS.) */
export function isNbdUri(spec: string): boolean {
  return /^nbds?(\+[a-z]+)?:\/\//i.test(spec);
}

export function openBacking(spec: string, opts: OpenBackingOptions = {}): Promise<BackingDevice> {
  return isNbdUri(spec) ? openNbdBacking(spec, opts.nbd) : openFileBacking(spec, opts.file);
}
