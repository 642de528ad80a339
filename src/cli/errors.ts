/** Exit statuses, after BSD sysexits where one fits. */
export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;
export const EXIT_INTERNAL = 70;

/**
 * A failure the user can act on: printed as `pcache: <message>`, never with a stack trace.
 * Anything else that escapes a command is a bug in pcache and reported as an internal error.
 */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number = EXIT_FAILURE,
  ) {
    super(message);
    this.name = 'CliError';
  }
}

/** The command line itself is wrong; the dispatcher adds a pointer to the usage. */
export class UsageError extends CliError {
  constructor(message: string) {
    super(message, EXIT_USAGE);
    this.name = 'UsageError';
  }
}

/**
 * Errors from the operating system (ENOENT, EACCES, EBUSY, EIO, ...) describe the user's
 * environment, not a bug, and their messages already name the file and the failure.
 */
export function isSystemError(err: unknown): err is Error & { code: string } {
  if (!(err instanceof Error)) return false;
  const code: unknown = (err as { code?: unknown }).code;
  return typeof code === 'string' && /^E[A-Z0-9]+$/.test(code);
}

export function messageOf(err: unknown): string {
  if (err instanceof Error) return err.message || err.name;
  return String(err);
}
