# orchgate: the gateway (and the NPU worker, which needs the same Python environment)
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY backends ./backends
COPY policies ./policies
RUN pip install --no-cache-dir ".[cluster]" && useradd --system --create-home orchgate
USER orchgate
EXPOSE 8080
CMD ["orchgate", "serve", "--config", "/etc/orchgate/orchgate.toml"]
