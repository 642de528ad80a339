/** The part of fs-native-extensions pcache uses (the package ships no types). */
declare module 'fs-native-extensions' {
  /**
   * An open-file-description lock (fcntl F_OFD_SETLK on Linux) on the whole file: false when
   * another description holds a conflicting one, an error when the filesystem cannot lock.
   */
  export function tryLock(fd: number, opts?: { shared?: boolean }): boolean;
  export function unlock(fd: number): void;
}
