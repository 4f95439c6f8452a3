// A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records every request, checks its
// signature with the secret it is given, and answers with the status the test scripts (default 200).

import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { verifySignature, type WebhookBody } from '../../src/events/webhooks.js';

export interface Received {
  readonly headers: IncomingMessage['headers'];
  readonly raw: string;
  readonly body: WebhookBody;
  /** The signature verified with the receiver's secret (undefined when no secret was set). */
  readonly signatureOk: boolean | undefined;
  /** The status this receiver answered. */
  readonly answered: number;
}

export interface Receiver {
  readonly url: string;
  readonly port: number;
  readonly requests: Received[];
  /** Answers, in order, for the next requests; 200 once they are used up. */
  answers: number[];
  secret: string | undefined;
  /** Requests whose body event is `event` (and that were answered 2xx, with accepted: true). */
  of(event: string, options?: { accepted?: boolean }): Received[];
  /** Resolves when `predicate` holds for the requests, or rejects after timeoutMs. */
  waitFor(predicate: (requests: readonly Received[]) => boolean, timeoutMs?: number, step?: () => Promise<unknown>): Promise<void>;
  close(): Promise<void>;
}

export async function startReceiver(options: { path?: string; secret?: string; port?: number } = {}): Promise<Receiver> {
  const requests: Received[] = [];
  const receiver = { answers: [] as number[], secret: options.secret } as Receiver;
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks).toString('utf8');
      const answered = receiver.answers.shift() ?? 200;
      let body: WebhookBody;
      try { body = JSON.parse(raw) as WebhookBody; } catch { body = { id: '?', event: 'issued', at: '', data: {} }; }
      const signatureOk = receiver.secret === undefined ? undefined : verifySignature(receiver.secret, raw, req.headers['hallmark-signature'] as string | undefined);
      requests.push({ headers: req.headers, raw, body, signatureOk, answered });
      res.writeHead(answered, { 'content-type': 'text/plain', connection: 'close' }).end(answered < 300 ? 'ok' : 'receiver says no');
    });
  });
  await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(options.port ?? 0, '127.0.0.1', resolve); });
  const port = (server.address() as AddressInfo).port;
  return Object.assign(receiver, {
    url: `http://127.0.0.1:${port}${options.path ?? '/hooks/hallmark'}`,
    port,
    requests,
    of: (event: string, o: { accepted?: boolean } = {}) => requests.filter((r) => r.body.event === event && (!o.accepted || r.answered < 300)),
    async waitFor(predicate: (requests: readonly Received[]) => boolean, timeoutMs = 10_000, step?: () => Promise<unknown>) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        if (step) await step();
        if (predicate(requests)) return;
        if (Date.now() > deadline) throw new Error(`receiver: condition not met within ${timeoutMs} ms; got ${requests.map((r) => `${r.body.event}:${r.answered}`).join(', ') || 'nothing'}`);
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
    },
    close: () => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
  });
}

/** A port on 127.0.0.1 where nothing listens (a receiver that is down). */
export async function deadPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}
