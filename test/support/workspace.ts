import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { createReadStream } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';

/** A temp folder for one test file, removed by `cleanup` (call it from `after`). */
export async function makeWorkspace(prefix: string): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  // /var/tmp: a real disk, unlike a tmpfs /tmp; short path so unix socket paths stay under 108 bytes.
  const dir = await mkdtemp(join(process.env.SNAPSHIFT_TEST_TMP ?? (tmpdir() === '/tmp' ? '/var/tmp' : tmpdir()), `ss-${prefix}-`));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** md5 of a file's bytes. */
export async function md5File(path: string): Promise<string> {
  const hash = createHash('md5');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/**
 * md5 of an image's guest-visible content, whatever its format: qemu-img converts it to raw first.
 * `-U` lets us read an image QEMU holds open (a frozen base under a VM snapshot).
 */
export async function md5OfImage(imagePath: string, format: string, scratchDir: string): Promise<string> {
  const raw = join(scratchDir, `md5-${process.hrtime.bigint()}.raw`);
  try {
    await exec('qemu-img', ['convert', '-U', '-f', format, '-O', 'raw', imagePath, raw], { timeoutMs: 600_000 });
    return await md5File(raw);
  } finally {
    await rm(raw, { force: true });
  }
}

/** Runs bin/snapshift and returns exit status and output, never throwing on a non-zero exit. */
export async function runCli(args: string[], env: Record<string, string> = {}): Promise<{ status: number; stdout: string; stderr: string }> {
  const { spawn } = await import('node:child_process');
  return new Promise((resolve, reject) => {
    const child = spawn('bin/snapshift', args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('error', reject);
    child.on('exit', (code, signal) => resolve({ status: code ?? (signal ? 128 : 1), stdout, stderr }));
  });
}
