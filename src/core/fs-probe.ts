import { access, stat } from 'node:fs/promises';

/** True when something exists at `path` (a missing path or no permission to see it: false). */
export async function pathExists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

/** True when `path` is a unix socket (a server is, or was, listening there). */
export async function isSocket(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined))?.isSocket() ?? false;
}
