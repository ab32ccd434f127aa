import { lstat, readlink } from 'node:fs/promises';
import { SnapshiftError } from '../../core/errors.ts';

/** As Linux's own limit (MAXSYMLINKS): more hops than this is a loop. */
const maxSymlinkHops = 40;

/**
 * The host path of `inner` inside a guest filesystem mounted at `root`, with every symlink on the way resolved
 * as the guest would: an absolute target starts again from the guest's root, never the host's, and ".." stops
 * at the root. The last component is followed only when `followLast` (the user wrote a trailing slash).
 * One lstat/readlink at a time: see docs/NOTES.md § File-level restore on why this process must never block
 * several of Node's threads on its own mount.
 */
export async function resolveInsideGuest(root: string, inner: string, guestPrefix: string, followLast: boolean): Promise<string> {
  const resolved: string[] = [];
  const pending = inner.split('/').filter((component) => component !== '' && component !== '.');
  let hops = 0;
  const shown = () => `${guestPrefix}/${resolved.join('/')}`.replace(/\/$/, '');
  while (pending.length > 0) {
    const component = pending.shift()!;
    if (component === '..') {
      resolved.pop();
      continue;
    }
    const hostPath = [root, ...resolved, component].join('/');
    let info;
    try {
      info = await lstat(hostPath);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw new SnapshiftError('FILES_PATH_NOT_FOUND', `${shown()}/${component}: no such file or directory in the restore point`);
      if (code === 'ENOTDIR') throw new SnapshiftError('FILES_PATH_NOT_FOUND', `${shown()} is not a directory`);
      throw new SnapshiftError('FILES_MOUNT_FAILED', `${shown()}/${component} cannot be read from the mounted filesystem: ${(error as Error).message}`);
    }
    if (info.isSymbolicLink() && (pending.length > 0 || followLast)) {
      if (++hops > maxSymlinkHops) throw new SnapshiftError('FILES_PATH_NOT_FOUND', `${shown()}/${component}: too many levels of symbolic links`);
      const target = await readlink(hostPath);
      if (target.startsWith('/')) resolved.length = 0;
      pending.unshift(...target.split('/').filter((part) => part !== '' && part !== '.'));
      continue;
    }
    if (pending.length > 0 && !info.isDirectory()) throw new SnapshiftError('FILES_PATH_NOT_FOUND', `${shown()}/${component} is not a directory`);
    resolved.push(component);
  }
  return [root, ...resolved].join('/');
}
