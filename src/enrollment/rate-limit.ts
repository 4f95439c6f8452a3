// Token-bucket rate limits kept in memory, per key (a client address, a claim). A bucket holds up to
// `burst` tokens and refills at `perMinute`; a request takes one. The map is bounded: when it is full,
// buckets that have refilled completely (and so carry no state worth keeping) are dropped first.

import { HallmarkError } from '../errors.js';

interface Bucket { tokens: number; at: number }

export class RateLimiter {
  readonly #buckets = new Map<string, Bucket>();
  readonly #maxKeys: number;

  constructor(maxKeys = 100_000) {
    this.#maxKeys = maxKeys;
  }

  /**
   * Takes one token for `key` at `perMinute` (burst: a tenth of a minute's worth, at least 10).
   * Returns 0 when allowed, or the seconds to wait.
   */
  take(key: string, perMinute: number, now = Date.now()): number {
    if (perMinute <= 0) return 0;
    const burst = Math.max(10, Math.ceil(perMinute / 10));
    const ratePerMs = perMinute / 60_000;
    let b = this.#buckets.get(key);
    if (!b) {
      if (this.#buckets.size >= this.#maxKeys) this.#evict(now, ratePerMs, burst);
      b = { tokens: burst, at: now };
      this.#buckets.set(key, b);
    } else {
      b.tokens = Math.min(burst, b.tokens + (now - b.at) * ratePerMs);
      b.at = now;
    }
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return 0;
    }
    return Math.max(1, Math.ceil((1 - b.tokens) / ratePerMs / 1000));
  }

  /** Gives back a token taken for `key` (a request that turned out not to count, e.g. a successful login). */
  refund(key: string): void {
    const b = this.#buckets.get(key);
    if (b) b.tokens += 1;
  }

  /** Throws RATE_LIMITED (with the wait in seconds) when `key` is over its rate. */
  check(key: string, perMinute: number, what: string): void {
    const wait = this.take(key, perMinute);
    if (wait > 0) throw Object.assign(new HallmarkError('RATE_LIMITED', `too many requests ${what}; retry in ${wait} s`), { retryAfterSeconds: wait });
  }

  #evict(now: number, ratePerMs: number, burst: number): void {
    for (const [k, b] of this.#buckets) {
      if (b.tokens + (now - b.at) * ratePerMs >= burst) this.#buckets.delete(k);
    }
    // Still full (a flood of distinct keys): drop the oldest half rather than grow without bound.
    if (this.#buckets.size >= this.#maxKeys) {
      let n = Math.floor(this.#maxKeys / 2);
      for (const k of this.#buckets.keys()) {
        if (n-- <= 0) break;
        this.#buckets.delete(k);
      }
    }
  }

  get size(): number {
    return this.#buckets.size;
  }
}
