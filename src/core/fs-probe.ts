import { access, readdir, readlink, stat } from 'node:fs/promises';

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

/**
 * Which of `paths` some process holds open, read from /proc/<pid>/fd (Linux; a process we may not inspect
 * counts as holding nothing). Used before deleting a file a process we cannot ask might still write.
 */
export async function pathsHeldOpen(paths: readonly string[]): Promise<Set<string>> {
  const wanted = new Set(paths);
  const held = new Set<string>();
  if (wanted.size === 0) return held;
  for (const pid of (await readdir('/proc').catch(() => [])).filter((name) => /^\d+$/.test(name))) {
    const descriptors = await readdir(`/proc/${pid}/fd`).catch(() => []);
    for (const fd of descriptors) {
      const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => undefined);
      if (target !== undefined && wanted.has(target)) held.add(target);
    }
  }
  return held;
}
