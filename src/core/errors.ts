/**
 * The one error class of snapshift: a stable `code` that programs match on and a message that tells a
 * person what happened and what to do. The CLI maps codes to exit statuses and prints the message alone.
 */
export class SnapshiftError extends Error {
  override readonly name = 'SnapshiftError';
  constructor(
    readonly code: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** Exit statuses a user can rely on (DESIGN.md § Conventions). */
export const ExitStatus = {
  success: 0,
  warning: 1,
  failed: 2,
  usage: 64,
} as const;

/** Codes that mean the user asked for something malformed, not that the work failed. */
const usageCodes = new Set(['USAGE', 'BAD_ARGUMENT']);

export function exitStatusFor(error: unknown): number {
  if (error instanceof SnapshiftError && usageCodes.has(error.code)) return ExitStatus.usage;
  return ExitStatus.failed;
}

/**
 * The message of any thrown value, for one-line error output. A SuppressedError (`await using` whose body
 * and disposal both threw) says "An error was suppressed during disposal": tell both, the first cause first.
 */
export function messageOf(error: unknown): string {
  if (isSuppressedError(error)) return `${messageOf(error.suppressed)}; then, while undoing: ${messageOf(error.error)}`;
  return error instanceof Error ? error.message : String(error);
}

function isSuppressedError(error: unknown): error is Error & { error: unknown; suppressed: unknown } {
  return error instanceof Error && error.name === 'SuppressedError' && 'suppressed' in error && 'error' in error;
}
