// HTTP wiring. Two listeners:
//   HTTPS  — EST enrolment under /.well-known/est, admin API under /api/v1 (bearer tokens), OpenAPI
//            document, health; TLS 1.2/1.3 with client certificates requested but optional (EST
//            checks them itself: birth certificates chain to vendor CAs, not to Hallmark).
//   HTTP   — public data only (CA certificates; later CRLs and OCSP), health.
// Routes parse and render; the Authority decides and signs.

import type { AddressInfo } from 'node:net';
import type { SecureContextOptions, Server as TlsServer } from 'node:tls';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import type { Authority } from '../authority/authority.js';
import { HallmarkError } from '../errors.js';
import { loadHomeConfig } from '../authority/home.js';
import { needsTlsRenewal, renewServerTls, serverTls, type ServerTls } from '../authority/server-tls.js';
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
  /** OCSP responses signed on demand (nonce, cache miss) per minute per client address (0: no limit). Default 6,000. */
  readonly ocspOnDemandPerMinute?: number;
  /** How often revocations made by other processes are looked for (ms). Default 1000. */
  readonly revocationPollMs?: number;
  /** The webhook dispatcher's intervals, backoff and timeout (tests shorten them); enabled: false turns it off. */
  readonly webhooks?: WebhookDispatcherOptions;
  /** How often the HTTPS certificate is checked (renewed within 30 days of expiry, or reloaded after `hallmark tls renew`). Default 1 h. */
  readonly tlsCheckMs?: number;
}

export type HttpsAppOptions = Pick<ServerOptions, 'requestTimeoutMs' | 'estPerClientPerMinute' | 'ocspOnDemandPerMinute'>;

/** Default time for a whole request to arrive. */
export const REQUEST_TIMEOUT_MS = 30_000;

export interface RunningServers {
  readonly https: FastifyInstance;
  readonly http: FastifyInstance;
  readonly httpsUrl: string;
  readonly httpUrl: string;
  /** The HTTPS certificate's keeper (check() runs a check now). */
  readonly tls: { check(now?: Date): Promise<void> };
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

export async function buildHttpsApp(authority: Authority, logger: Logger, options: HttpsAppOptions & { readonly tls?: ServerTls } = {}): Promise<FastifyInstance> {
  const tls = options.tls ?? (await serverTls(authority));
  const trust = (await authority.caChain(await authority.rootName(), false)).map((d) => encodePem('CERTIFICATE', d)).join('');
  const app = Fastify({
    https: {
      // The key stays in memory; it is decrypted from the key store at start-up.
      ...secureContextOptions(tls, trust),
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
  await registerOcspRoutes(app, authority, ocspOptions(options));
  registerCrlRoutes(app, authority);
  return app;
}

const ocspOptions = (options: Pick<ServerOptions, 'ocspOnDemandPerMinute'>) => (options.ocspOnDemandPerMinute === undefined ? {} : { onDemandPerMinute: options.ocspOnDemandPerMinute });

export async function buildHttpApp(authority: Authority, logger: Logger, options: Pick<ServerOptions, 'ocspOnDemandPerMinute'> = {}): Promise<FastifyInstance> {
  // One access-log line per request (OCSP and CRL fetches are frequent), as on the HTTPS listener.
  const app = Fastify({ loggerInstance: logger as FastifyBaseLogger, bodyLimit: BODY_LIMIT, ajv: AJV_OPTIONS, disableRequestLogging: true }) as unknown as FastifyInstance;
  installErrorHandling(app);
  app.addHook('onResponse', accessLog);
  registerPublicRoutes(app, authority);
  await registerOcspRoutes(app, authority, ocspOptions(options));
  registerCrlRoutes(app, authority);
  return app;
}

function secureContextOptions(tls: ServerTls, trust: string): SecureContextOptions {
  return { key: tls.keyPem, cert: tls.chainPem, ca: trust, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3' };
}

/**
 * Keeps the HTTPS listener's certificate current: every `everyMs`, picks up a certificate renewed by
 * another process (`hallmark tls renew`), and renews it here when fewer than TLS_RENEW_WITHIN_DAYS are
 * left. The listener's TLS context is replaced in place; connections already open keep theirs.
 */
export function keepServerTls(authority: Authority, https: FastifyInstance, logger: Logger, everyMs: number, loadedSerial: string): { check(now?: Date): Promise<void>; stop(): void } {
  let serial = loadedSerial;
  let running: Promise<void> | undefined;
  const check = (now = new Date()): Promise<void> => (running ??= (async () => {
    try {
      // Another process may have renewed: its key reference is in the configuration on disk.
      authority.config.tls = (await loadHomeConfig(authority.home)).tls;
      let tls = await serverTls(authority).catch(async (err: unknown) => {
        logger.error({ err }, 'the TLS certificate and key do not match: renewing');
        return renewServerTls(authority, { actor: 'server' });
      });
      if (needsTlsRenewal(tls.notAfter, now)) {
        tls = await renewServerTls(authority, { actor: 'server' });
        logger.info({ serial: tls.serial, notAfter: tls.notAfter.toISOString() }, 'TLS certificate renewed');
      }
      if (tls.serial !== serial) {
        const trust = (await authority.caChain(await authority.rootName(), false)).map((d) => encodePem('CERTIFICATE', d)).join('');
        (https.server as unknown as TlsServer).setSecureContext(secureContextOptions(tls, trust));
        serial = tls.serial;
        logger.info({ serial, notAfter: tls.notAfter.toISOString() }, 'TLS certificate loaded');
      }
    } catch (err) {
      // Another process renewing: its certificate is loaded at the next check.
      if (err instanceof HallmarkError && err.code === 'TLS_RENEWAL_IN_PROGRESS') logger.info({ reason: err.message }, 'TLS certificate renewal left to another process');
      else logger.error({ err }, 'TLS certificate check failed');
    } finally {
      running = undefined;
    }
  })());
  const timer = setInterval(() => { void check(); }, everyMs);
  timer.unref();
  return { check, stop: () => clearInterval(timer) };
}

export async function startServers(authority: Authority, options: ServerOptions): Promise<RunningServers> {
  // A certificate that expired (or nearly) while the server was down is renewed before listening.
  let tls = await serverTls(authority).catch(() => undefined);
  if (!tls || needsTlsRenewal(tls.notAfter)) {
    tls = await renewServerTls(authority, { actor: 'server' });
    options.logger.info({ serial: tls.serial, notAfter: tls.notAfter.toISOString() }, 'TLS certificate renewed');
  }
  const https = await buildHttpsApp(authority, options.logger, { ...options, tls });
  const http = await buildHttpApp(authority, options.logger, options);
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
  const tlsKeeper = keepServerTls(authority, https, options.logger, options.tlsCheckMs ?? 3_600_000, tls.serial);
  const webhooks = startWebhookDispatcher(authority.store, { logger: options.logger, ...options.webhooks });
  const hostForUrl = options.host.includes(':') ? `[${options.host}]` : options.host;
  return {
    https,
    http,
    httpsUrl: `https://${hostForUrl}:${(https.server.address() as AddressInfo).port}`,
    httpUrl: `http://${hostForUrl}:${(http.server.address() as AddressInfo).port}`,
    tls: tlsKeeper,
    async close() {
      stopWatching();
      tlsKeeper.stop();
      await Promise.all([https.close(), http.close(), webhooks.stop()]);
    },
  };
}
