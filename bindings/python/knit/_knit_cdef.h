#define KNIT_CHANNEL_SINGLE 0

#define KNIT_CHANNEL_MULTI 1

#define KNIT_CONNECT_POLL 1

#define KNIT_CONNECT_SPIN 2

#define KNIT_CONNECT_PARK 4

#define KNIT_DEFAULT_WAIT_MS 30000

#define KNIT_DEFAULT_TIMEOUT_MS 30000

#define KNIT_STREAM_PRIVATE 1

#define KNIT_STREAM_SERVER_INITIATED 2

typedef struct knit_client knit_client;

typedef struct knit_reply knit_reply;

typedef struct knit_stream knit_stream;

typedef struct knit_stream_request knit_stream_request;

typedef struct knit_stream_subscriber knit_stream_subscriber;

typedef struct knit_subscription knit_subscription;

typedef int32_t knit_status_t;

typedef knit_client knit_client_t;

typedef void (*knit_message_fn)(void *user_data,
                                const char *topic,
                                const char *data_json,
                                const char *source_json);

typedef knit_subscription knit_subscription_t;

typedef void (*knit_channel_fn)(void *user_data,
                                const char *channel,
                                const char *data_json,
                                const char *context_json,
                                uint64_t version);

typedef void (*knit_channels_changed_fn)(void *user_data, const char *channels_json);

typedef void (*knit_context_fn)(void *user_data,
                                const char *name,
                                const char *data_json,
                                const char *delta_json,
                                uint64_t version);

typedef void (*knit_context_update_fn)(void *user_data, const char *update_json);

typedef void (*knit_event_fn)(void *user_data, const char *event_json);

typedef knit_reply knit_reply_t;

typedef void (*knit_method_fn)(void *user_data,
                               const char *args_json,
                               const char *caller_json,
                               knit_reply_t *reply);

typedef void (*knit_bytes_method_fn)(void *user_data,
                                     const uint8_t *args,
                                     size_t args_len,
                                     const char *caller_json,
                                     knit_reply_t *reply);

typedef knit_stream_request knit_stream_request_t;

typedef void (*knit_stream_request_fn)(void *user_data,
                                       knit_stream_request_t *request,
                                       const char *args_json,
                                       const char *caller_json);

typedef knit_stream knit_stream_t;

typedef knit_stream_subscriber knit_stream_subscriber_t;

typedef void (*knit_stream_data_fn)(void *user_data,
                                    const char *data_json,
                                    const char *server_json,
                                    uint32_t flags,
                                    uint64_t gap);

typedef void (*knit_stream_closed_fn)(void *user_data, const char *reason, uint32_t flags);

#define KNIT_OK 0

#define KNIT_INVALID_ARGUMENT 1

#define KNIT_NO_SERVER 3

#define KNIT_TIMEOUT 4

#define KNIT_METHOD_FAILED 5

#define KNIT_GATEWAY_UNREACHABLE 6

#define KNIT_PERMISSION_DENIED 7

#define KNIT_BAD_INPUT 8

#define KNIT_PAYLOAD_TOO_LARGE 9

#define KNIT_PEER_LEFT 10

#define KNIT_DISCONNECTED 11

#define KNIT_ALREADY_EXISTS 12

#define KNIT_NOT_FOUND 13

#define KNIT_CLOSED 14

#define KNIT_PROTOCOL 15

#define KNIT_INTERNAL 16

#define KNIT_ALREADY_RUNNING 17

#define KNIT_BUSY 18

knit_status_t knit_publish(knit_client_t *client, const char *topic, const char *data_json);

knit_status_t knit_publish_ex(knit_client_t *client,
                              const char *topic,
                              const char *data_json,
                              const char *options_json);

knit_status_t knit_publish_batch(knit_client_t *client,
                                 const char *topic,
                                 const char *items_json,
                                 const char *options_json);

knit_status_t knit_subscribe(knit_client_t *client,
                             const char *topic,
                             knit_message_fn fn,
                             void *user_data,
                             knit_subscription_t **out);

knit_status_t knit_subscribe_ex(knit_client_t *client,
                                const char *topic,
                                const char *options_json,
                                knit_message_fn fn,
                                void *user_data,
                                knit_subscription_t **out);

knit_status_t knit_channel_list(knit_client_t *client, char **json_out);

knit_status_t knit_channel_get(knit_client_t *client, const char *name, char **json_out);

knit_status_t knit_channel_set_mode(knit_client_t *client, uint32_t mode);

knit_status_t knit_channel_join(knit_client_t *client, const char *name);

knit_status_t knit_channel_leave(knit_client_t *client, const char *name);

knit_status_t knit_channel_joined(knit_client_t *client, char **names_json_out);

knit_status_t knit_channel_publish(knit_client_t *client,
                                   const char *data_json,
                                   const char *name,
                                   uint64_t *version_out);

knit_status_t knit_channel_publish_fdc3(knit_client_t *client,
                                        const char *context_json,
                                        const char *name,
                                        uint64_t *version_out);

knit_status_t knit_channel_subscribe(knit_client_t *client,
                                     knit_channel_fn fn,
                                     void *user_data,
                                     knit_subscription_t **out);

knit_status_t knit_channel_subscribe_for(knit_client_t *client,
                                         const char *name,
                                         knit_channel_fn fn,
                                         void *user_data,
                                         knit_subscription_t **out);

knit_status_t knit_channel_on_changed(knit_client_t *client,
                                      knit_channels_changed_fn fn,
                                      void *user_data,
                                      knit_subscription_t **out);

knit_status_t knit_client_connect(const char *gateway,
                                  const char *application,
                                  uint32_t flags,
                                  knit_client_t **out);

knit_status_t knit_client_connect_ex(const char *gateway,
                                     const char *application,
                                     const char *instance,
                                     uint32_t flags,
                                     uint32_t connect_timeout_ms,
                                     knit_client_t **out);

knit_status_t knit_client_close(knit_client_t *client);

knit_status_t knit_client_poll(knit_client_t *client, uint32_t timeout_ms, uint32_t *handled_out);

knit_status_t knit_client_connected(knit_client_t *client);

knit_status_t knit_client_instance(knit_client_t *client, char **json_out);

knit_status_t knit_client_max_payload(knit_client_t *client, uint64_t *out);

knit_status_t knit_methods(knit_client_t *client, char **json_out);

knit_status_t knit_servers(knit_client_t *client, char **json_out);

knit_status_t knit_wait_for_method(knit_client_t *client,
                                   const char *method,
                                   uint32_t timeout_ms,
                                   char **json_out);

knit_status_t knit_context_get(knit_client_t *client, const char *name, char **data_json_out);

knit_status_t knit_context_get_ex(knit_client_t *client,
                                  const char *name,
                                  char **data_json_out,
                                  uint64_t *version_out);

knit_status_t knit_context_set(knit_client_t *client, const char *name, const char *data_json);

knit_status_t knit_context_set_ex(knit_client_t *client,
                                  const char *name,
                                  const char *data_json,
                                  uint64_t *version_out);

knit_status_t knit_context_update(knit_client_t *client, const char *name, const char *delta_json);

knit_status_t knit_context_update_ex(knit_client_t *client,
                                     const char *name,
                                     const char *delta_json,
                                     uint64_t *version_out);

knit_status_t knit_context_update_if(knit_client_t *client,
                                     const char *name,
                                     uint64_t expected_version,
                                     const char *delta_json,
                                     uint64_t *version_out);

knit_status_t knit_context_set_path(knit_client_t *client,
                                    const char *name,
                                    const char *path,
                                    const char *value_json,
                                    uint64_t *version_out);

knit_status_t knit_context_set_paths(knit_client_t *client,
                                     const char *name,
                                     const char *paths_json,
                                     uint64_t *version_out);

knit_status_t knit_context_destroy(knit_client_t *client, const char *name);

knit_status_t knit_context_list(knit_client_t *client, char **names_json_out);

knit_status_t knit_context_subscribe(knit_client_t *client,
                                     const char *name,
                                     knit_context_fn fn,
                                     void *user_data,
                                     knit_subscription_t **out);

knit_status_t knit_context_subscribe_ex(knit_client_t *client,
                                        const char *name,
                                        knit_context_update_fn fn,
                                        void *user_data,
                                        knit_subscription_t **out);

knit_status_t knit_events_subscribe(knit_client_t *client,
                                    knit_event_fn fn,
                                    void *user_data,
                                    knit_subscription_t **out);

knit_status_t knit_reply_ok(knit_reply_t *reply, const char *result_json);

knit_status_t knit_reply_bytes(knit_reply_t *reply, const uint8_t *data, size_t len);

knit_status_t knit_reply_error(knit_reply_t *reply, const char *message);

knit_status_t knit_reply_error_ex(knit_reply_t *reply,
                                  const char *message,
                                  const char *context_json);

knit_status_t knit_register(knit_client_t *client,
                            const char *method,
                            knit_method_fn handler,
                            void *user_data);

knit_status_t knit_register_ex(knit_client_t *client,
                               const char *definition_json,
                               knit_method_fn handler,
                               void *user_data);

knit_status_t knit_register_bytes(knit_client_t *client,
                                  const char *method,
                                  knit_bytes_method_fn handler,
                                  void *user_data);

knit_status_t knit_unregister(knit_client_t *client, const char *method);

knit_status_t knit_invoke(knit_client_t *client,
                          const char *method,
                          const char *args_json,
                          const char *target,
                          uint32_t timeout_ms,
                          char **result_json_out);

knit_status_t knit_invoke_ex(knit_client_t *client,
                             const char *method,
                             const char *args_json,
                             const char *target,
                             uint32_t wait_ms,
                             uint32_t timeout_ms,
                             char **result_json_out);

knit_status_t knit_invoke_bytes(knit_client_t *client,
                                const char *method,
                                const uint8_t *data,
                                size_t len,
                                const char *target,
                                uint32_t wait_ms,
                                uint32_t timeout_ms,
                                uint8_t **out,
                                size_t *out_len);

const char *knit_status_string(knit_status_t status);

const char *knit_status_name(knit_status_t status);

const char *knit_status_family(knit_status_t status);

const char *knit_version(void);

const char *knit_last_error_message(void);

knit_status_t knit_stream_create(knit_client_t *client,
                                 const char *name,
                                 const char *options_json,
                                 knit_stream_request_fn on_request,
                                 void *user_data,
                                 knit_stream_t **out);

knit_status_t knit_stream_push(knit_stream_t *stream, const char *data_json);

knit_status_t knit_stream_push_batch(knit_stream_t *stream, const char *items_json);

knit_status_t knit_stream_push_branches(knit_stream_t *stream,
                                        const char *branches_json,
                                        const char *data_json);

knit_status_t knit_stream_close_branch(knit_stream_t *stream, const char *branch);

knit_status_t knit_stream_branches(knit_stream_t *stream, char **json_out);

knit_status_t knit_stream_subscriptions(knit_stream_t *stream, char **json_out);

knit_status_t knit_stream_close(knit_stream_t *stream);

knit_status_t knit_stream_accept(knit_stream_request_t *request,
                                 const char *branch,
                                 knit_stream_subscriber_t **subscriber_out);

knit_status_t knit_stream_reject(knit_stream_request_t *request, const char *reason);

knit_status_t knit_stream_subscriber_push(knit_stream_subscriber_t *subscriber,
                                          const char *data_json);

knit_status_t knit_stream_subscriber_close(knit_stream_subscriber_t *subscriber);

knit_status_t knit_stream_subscriber_free(knit_stream_subscriber_t *subscriber);

knit_status_t knit_stream_subscribe(knit_client_t *client,
                                    const char *name,
                                    const char *args_json,
                                    const char *target,
                                    uint32_t wait_ms,
                                    uint32_t timeout_ms,
                                    knit_stream_data_fn on_data,
                                    knit_stream_closed_fn on_closed,
                                    void *user_data,
                                    knit_subscription_t **out);

void knit_string_free(char *s);

void knit_bytes_free(uint8_t *data);

knit_status_t knit_subscription_close(knit_subscription_t *subscription);
