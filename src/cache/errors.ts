/**
 * An error for the user: a bad option, a refused or damaged cache device, a failed device.
 * `code` carries an errno name where one applies, so the NBD server can send it to the client.
 */
export class CacheError extends Error {
  constructor(
    message: string,
    readonly code: string = 'EINVAL',
  ) {
    super(message);
    this.name = 'CacheError';
  }
}

/** Errors from devices keep their errno code; anything else becomes EIO. */
export function ioError(err: unknown, what: string): Error {
  if (err instanceof CacheError) return err;
  const code = (err as { code?: unknown })?.code;
  const msg = err instanceof Error ? err.message : String(err);
  return new CacheError(`${what}: ${msg}`, typeof code === 'string' && code.startsWith('E') ? code : 'EIO');
}

/** A write refused for space: a sparse cache file on a full filesystem. */
export function isNoSpace(err: unknown): boolean {
  return (err as { code?: unknown } | null)?.code === 'ENOSPC';
}
