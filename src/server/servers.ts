// HTTP wiring. Two listeners:
//   HTTPS  — EST enrolment under /.well-known/est, admin API under /api/v1 (bearer tokens), OpenAPI
//            document, health; TLS 1.2/1.3 with client certificates requested but optional (EST
//            checks them itself: birth certificates chain to vendor CAs, not to Hallmark).
//   HTTP   — public data only (CA certificates; later CRLs and OCSP), health.
// Routes parse and render; the Authority decides and signs.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import type { Authority } from '../authority/authority.js';
import { HOME_FILES } from '../authority/home.js';
import { encodePem } from '../pki/pem.js';
import { installErrorHandling } from './errors.js';
import { registerAdminApi } from './admin-api.js';
import { registerPublicRoutes } from './public-routes.js';
import { EnrolmentService } from '../enrollment/enrolment.js';
import { DEFAULT_EST_PER_CLIENT_PER_MINUTE, registerEstRoutes } from '../protocols/est/routes.js';
import { registerOcspRoutes } from '../protocols/ocsp/routes.js';
import { registerCrlRoutes } from '../protocols/crl/routes.js';
import { startWebhookDispatcher, type WebhookDispatcherOptions } from '../events/dispatcher.js';

export interface ServerOptions {
  readonly host: string;
  readonly httpsPort: number;
  readonly httpPort: number;
  readonly logger: Logger;
  /** A request must arrive whole within this (a client sending one byte a second is cut off). Default 30 s. */
  readonly requestTimeoutMs?: number;
  /** EST requests per minute per client address (0: no limit). */
  readonly estPerClientPerMinute?: number;
  /** How often revocations made by other processes are looked for (ms). Default 1000. */
  readonly revocationPollMs?: number;
  /** The webhook dispatcher's intervals, backoff and timeout (tests shorten them); enabled: false turns it off. */
  readonly webhooks?: WebhookDispatcherOptions;
}

export type HttpsAppOptions = Pick<ServerOptions, 'requestTimeoutMs' | 'estPerClientPerMinute'>;

/** Default time for a whole request to arrive. */
export const REQUEST_TIMEOUT_MS = 30_000;

export interface RunningServers {
  readonly https: FastifyInstance;
  readonly http: FastifyInstance;
  readonly httpsUrl: string;
  readonly httpUrl: string;
  close(): Promise<void>;
}

/** Request bodies above this are refused with 413 before they are parsed. */
export const BODY_LIMIT = 256 * 1024;

/** Unknown body fields are an error, not silently dropped (Fastify's default removes them). */
const AJV_OPTIONS = { customOptions: { removeAdditional: false, coerceTypes: 'array' as const, allErrors: false } };

function accessLog(request: FastifyRequest, reply: FastifyReply, done: () => void): void {
  request.log.info({ method: request.method, url: request.url.split('?')[0], status: reply.statusCode, ms: Math.round(reply.elapsedTime * 10) / 10 }, 'request');
  done();
}

export async function buildHttpsApp(authority: Authority, logger: Logger, options: HttpsAppOptions = {}): Promise<FastifyInstance> {
  const key = await authority.fileKeys.privateKeyObject(authority.config.tls.keyRef);
  const chain = readFileSync(join(authority.home, HOME_FILES.tlsChain), 'utf8');
  const trust = (await authority.caChain(await authority.rootName(), false)).map((d) => encodePem('CERTIFICATE', d)).join('');
  const app = Fastify({
    https: {
      // The key stays in memory; it is decrypted from the key store at start-up.
      key: key.export({ format: 'pem', type: 'pkcs8' }) as string,
      cert: chain,
      ca: trust,
      minVersion: 'TLSv1.2',
      maxVersion: 'TLSv1.3',
      requestCert: true,
      rejectUnauthorized: false,
      // Slow clients: a request must arrive whole within requestTimeout; Node checks open requests every
      // connectionsCheckingInterval (default 30 s, too coarse for a short timeout).
      requestTimeout: options.requestTimeoutMs ?? REQUEST_TIMEOUT_MS,
      headersTimeout: Math.min(options.requestTimeoutMs ?? REQUEST_TIMEOUT_MS, 10_000),
      connectionsCheckingInterval: Math.max(250, Math.min(5_000, Math.floor((options.requestTimeoutMs ?? REQUEST_TIMEOUT_MS) / 4))),
    },
    loggerInstance: logger as FastifyBaseLogger,
    bodyLimit: BODY_LIMIT,
    ajv: AJV_OPTIONS,
    requestTimeout: options.requestTimeoutMs ?? REQUEST_TIMEOUT_MS,
    // One access-log line per request (below) instead of Fastify's two: a busy EST endpoint logs half as much.
    disableRequestLogging: true,
    // Idle keep-alive connections are closed after this; devices enrol and go.
    keepAliveTimeout: 10_000,
  }) as unknown as FastifyInstance; // routes are written against the plain instance type; TLS is transparent to them
  installErrorHandling(app);
  app.addHook('onResponse', accessLog);
  await registerEstRoutes(app, authority, new EnrolmentService(authority), { perClientPerMinute: options.estPerClientPerMinute ?? DEFAULT_EST_PER_CLIENT_PER_MINUTE });
  await registerAdminApi(app, authority);
  registerPublicRoutes(app, authority);
  await registerOcspRoutes(app, authority);
  registerCrlRoutes(app, authority);
  return app;
}

export async function buildHttpApp(authority: Authority, logger: Logger): Promise<FastifyInstance> {
  // One access-log line per request (OCSP and CRL fetches are frequent), as on the HTTPS listener.
  const app = Fastify({ loggerInstance: logger as FastifyBaseLogger, bodyLimit: BODY_LIMIT, ajv: AJV_OPTIONS, disableRequestLogging: true }) as unknown as FastifyInstance;
  installErrorHandling(app);
  app.addHook('onResponse', accessLog);
  registerPublicRoutes(app, authority);
  await registerOcspRoutes(app, authority);
  registerCrlRoutes(app, authority);
  return app;
}

export async function startServers(authority: Authority, options: ServerOptions): Promise<RunningServers> {
  const https = await buildHttpsApp(authority, options.logger, options);
  const http = await buildHttpApp(authority, options.logger);
  await https.listen({ host: options.host, port: options.httpsPort });
  try {
    await http.listen({ host: options.host, port: options.httpPort });
  } catch (err) {
    await https.close();
    throw err;
  }
  // SQLite: WAL checkpoints in a worker thread, not inside commits on the event loop; group commits
  // (enrolments) in a writer thread with its own connection.
  authority.store.checkpointInBackground();
  authority.store.writeInBackground();
  // Revocations made by other processes (the CLI, another server) reach this one's CRL and OCSP caches.
  const stopWatching = authority.watchRevocations(options.revocationPollMs ?? 1000);
  const webhooks = startWebhookDispatcher(authority.store, { logger: options.logger, ...options.webhooks });
  const hostForUrl = options.host.includes(':') ? `[${options.host}]` : options.host;
  return {
    https,
    http,
    httpsUrl: `https://${hostForUrl}:${(https.server.address() as AddressInfo).port}`,
    httpUrl: `http://${hostForUrl}:${(http.server.address() as AddressInfo).port}`,
    async close() {
      stopWatching();
      await Promise.all([https.close(), http.close(), webhooks.stop()]);
    },
  };
}
