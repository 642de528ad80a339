/**
 * What is wrong with bytes read from a cache device. Decoders return one of these instead of
 * throwing, so a corrupt or forged device can always be reported, never crash a reader.
 */
export type FormatProblem =
  | 'too-short'
  | 'bad-magic'
  | 'bad-crc'
  | 'bad-flags'
  | 'bad-version'
  | 'bad-seg-num'
  | 'bad-segment'
  | 'bad-offset'
  | 'bad-key-num'
  | 'bad-key'
  | 'bad-chain'
  | 'bad-option'
  | 'device-too-small';

export class FormatError {
  constructor(
    readonly problem: FormatProblem,
    readonly message: string,
  ) {}
  toString(): string {
    return this.message;
  }
}

export function isFormatError(v: unknown): v is FormatError {
  return v instanceof FormatError;
}

/** A value read from media, or the reason it could not be. */
export type Decoded<T> = T | FormatError;
