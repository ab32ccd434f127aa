import { spawn } from 'node:child_process';
import { SnapshiftError } from '../core/errors.ts';
import { childEnv } from '../core/exec.ts';

export interface QemuImgConvertOptions {
  /** Ends qemu-img (SIGTERM to its PID) when aborted; the promise then rejects with the signal's reason. */
  signal?: AbortSignal;
  /** qemu-img's own progress (-p), as a fraction from 0 to 1. */
  onProgress?: (fraction: number) => void;
}

/**
 * Runs `qemu-img convert -p ARGS…`, reading its progress lines ("    (12.34/100%)\r") as it goes. A failure
 * names qemu-img's last stderr line; a missing qemu-img is PROGRAM_MISSING.
 */
export function qemuImgConvert(args: readonly string[], options: QemuImgConvertOptions = {}): Promise<void> {
  const fullArgs = ['convert', '-p', ...args];
  return new Promise((resolve, reject) => {
    if (options.signal?.aborted) return reject(options.signal.reason as Error);
    const child = spawn('qemu-img', fullArgs, { stdio: ['ignore', 'pipe', 'pipe'], env: childEnv() });
    let stderr = '';
    let pending = '';
    const onAbort = () => child.kill('SIGTERM');
    options.signal?.addEventListener('abort', onAbort, { once: true });
    child.stdout.setEncoding('utf8').on('data', (text: string) => {
      pending += text;
      const parts = pending.split(/[\r\n]/);
      pending = parts.pop() ?? '';
      for (const part of parts) {
        const match = /\(([\d.]+)\/100%\)/.exec(part);
        if (match) options.onProgress?.(Math.min(1, Number(match[1]) / 100));
      }
    });
    child.stderr.setEncoding('utf8').on('data', (text: string) => {
      stderr = (stderr + text).slice(-8192);
    });
    child.on('error', (error: NodeJS.ErrnoException) => {
      options.signal?.removeEventListener('abort', onAbort);
      if (error.code === 'ENOENT') reject(new SnapshiftError('PROGRAM_MISSING', 'qemu-img is not installed (needed for qcow2, block device and rbd targets; run "bash scripts/setup.sh")', { cause: error }));
      else reject(new SnapshiftError('COMMAND_FAILED', `qemu-img ${fullArgs.join(' ')} failed to start: ${error.message}`, { cause: error }));
    });
    child.on('close', (code, signal) => {
      options.signal?.removeEventListener('abort', onAbort);
      if (options.signal?.aborted) return reject(options.signal.reason as Error);
      if (code === 0) return resolve();
      const detail = stderr.trim().split('\n').at(-1)?.trim() || (signal ? `killed by ${signal}` : `exit status ${code}`);
      reject(new SnapshiftError('COMMAND_FAILED', `qemu-img ${fullArgs.join(' ')} failed: ${detail}`));
    });
  });
}
