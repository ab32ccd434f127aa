import assert from 'node:assert/strict';
import { SnapshiftError } from '../../src/core/errors.ts';

/** For `assert.rejects`: the error is a SnapshiftError with this code (and, if given, a message matching `text`). */
export function hasCode(code: string, text?: RegExp) {
  return (error: unknown) => {
    assert.ok(error instanceof SnapshiftError, `expected a SnapshiftError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    if (text) assert.match(error.message, text);
    return true;
  };
}
